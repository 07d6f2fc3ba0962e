"""Defect regions on point clouds, and whether the agent named them.

A ground-truth region is a connected set of anomalous points (`point_regions`); an agent finds a defect when
it
flags at least one point of its region, however large the region (`region_hits`, `region_recall`), and raises
a
false alarm when a flagged region holds no anomalous point (`false_region_count`, `false_region_rate`). The
harness
stores the counts per scan and the report pools them, so both use these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


def point_regions(
    points: np.ndarray, mask: np.ndarray, *, radius: float | None = None, k: int = 8
) -> np.ndarray:
    """Region id per point (-1 for normal points): connected components of the anomalous points.

    Two anomalous points are linked when one is among the other's ``k`` nearest neighbours *in the whole
    cloud*
    (so a band of normal points between two defects keeps them apart), or, when ``radius`` is given, when they
    are at
    most ``radius`` apart. Region ids are numbered 0..R-1 in order of each region's first point, so the result
    is
    deterministic. On a unit grid, ``radius=1.5`` reproduces 8-connectivity.
    """
    pts = as_points(points, "points")
    anomalous = as_mask(mask, len(pts), "mask")
    regions = np.full(len(pts), -1, dtype=np.int64)
    anomalous_idx = np.flatnonzero(anomalous)
    n_anomalous = len(anomalous_idx)
    if n_anomalous == 0:
        return regions

    if radius is not None:
        if not (np.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a positive finite number, got {radius}")
        # Only anomalous points can be linked, so the tree needs only them.
        pairs = cKDTree(pts[anomalous_idx]).query_pairs(float(radius), output_type="ndarray")
        rows, cols = pairs[:, 0], pairs[:, 1]
    else:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n_neighbours = min(k + 1, len(pts))  # +1: a point is its own nearest neighbour
        _, neighbours = cKDTree(pts).query(pts[anomalous_idx], k=n_neighbours)
        neighbours = neighbours.reshape(n_anomalous, n_neighbours)
        # Position of every cloud point among the anomalous ones (-1 if normal).
        anomalous_position = np.full(len(pts), -1, dtype=np.int64)
        anomalous_position[anomalous_idx] = np.arange(n_anomalous)
        targets = anomalous_position[neighbours]
        keep = targets >= 0
        rows = np.broadcast_to(np.arange(n_anomalous)[:, None], targets.shape)[keep]
        cols = targets[keep]

    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_anomalous, n_anomalous))
    _, component = connected_components(graph.tocsr(), directed=True, connection="weak")
    # Renumber by first appearance so ids do not depend on scipy's internal order.
    _, first_index, inverse = np.unique(component, return_index=True, return_inverse=True)
    rank = np.empty(len(first_index), dtype=np.int64)
    rank[np.argsort(first_index, kind="stable")] = np.arange(len(first_index))
    regions[anomalous_idx] = rank[inverse]
    return regions


def region_hits(
    points: np.ndarray,
    gt_mask: np.ndarray,
    flagged_mask: np.ndarray,
    *,
    min_overlap: int = 1,
    radius: float | None = None,
    k: int = 8,
) -> tuple[int, int]:
    """(ground-truth regions with at least ``min_overlap`` flagged points, ground-truth regions): the counts
    behind
    `region_recall`, which a report pools over scans."""
    if min_overlap < 1:
        raise ValueError(f"min_overlap must be >= 1, got {min_overlap}")
    pts = as_points(points, "points")
    flagged = as_mask(flagged_mask, len(pts), "flagged_mask")
    regions = point_regions(pts, as_mask(gt_mask, len(pts), "gt_mask"), radius=radius, k=k)
    n_regions = int(regions.max()) + 1
    if n_regions == 0:
        return 0, 0
    hits = np.bincount(regions[flagged & (regions >= 0)], minlength=n_regions)
    return int((hits >= min_overlap).sum()), n_regions


def region_recall(
    points: np.ndarray,
    gt_mask: np.ndarray,
    flagged_mask: np.ndarray,
    *,
    min_overlap: int = 1,
    radius: float | None = None,
    k: int = 8,
) -> float:
    """Share of ground-truth regions with at least ``min_overlap`` flagged points (nan if there is no GT
    region).

    This is what "the agent found the defect" means: one hit per region counts, however large the region.
    """
    found, n_regions = region_hits(points, gt_mask, flagged_mask, min_overlap=min_overlap, radius=radius, k=k)
    return found / n_regions if n_regions else math.nan


def false_region_rate(
    points: np.ndarray, gt_mask: np.ndarray, flagged_regions: Sequence[np.ndarray]
) -> float:
    """Share of flagged regions (arrays of point indices) that contain no GT-anomalous point (nan if none
    flagged).

    The counterpart of `region_recall`: how often the agent points at a place where nothing is wrong.
    """
    if len(flagged_regions) == 0:
        return math.nan
    return false_region_count(points, gt_mask, flagged_regions) / len(flagged_regions)


def false_region_count(points: np.ndarray, gt_mask: np.ndarray, flagged_regions: Sequence[np.ndarray]) -> int:
    """How many flagged regions (arrays of point indices) contain no GT-anomalous point."""
    n_points = len(as_points(points, "points"))
    anomalous = as_mask(gt_mask, n_points, "gt_mask")
    false_count = 0
    for index, region in enumerate(flagged_regions):
        idx = np.asarray(region)
        if idx.ndim != 1 or idx.size == 0:
            raise ValueError(f"flagged region {index} must be a non-empty 1-D array of point indices")
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"flagged region {index} must hold integer point indices, got {idx.dtype}")
        if idx.min() < 0 or idx.max() >= n_points:
            raise ValueError(f"flagged region {index} has indices outside 0..{n_points - 1}")
        false_count += not anomalous[idx].any()
    return false_count


def as_points(points: np.ndarray, what: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3) or len(pts) == 0:
        raise ValueError(f"{what} must be a non-empty (N, 3) or (N, 2) array, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"{what} contain NaN or inf")
    return pts


def as_mask(mask: np.ndarray, n: int, what: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {arr.shape}")
    return as_binary(arr, what)


def as_binary(labels: np.ndarray, what: str) -> np.ndarray:
    if labels.dtype == bool:
        return labels
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError(f"{what} must be binary (0/1 or bool), got values {np.unique(labels)[:5]}")
    return labels.astype(bool)
