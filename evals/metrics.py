"""Detection and localisation metrics for images (MVTec grids) and point clouds.

The PRO curve follows MVTec's official evaluation script v2.0 (BSD-3) step for step, so grid numbers match the
published evaluation to ~1e-12 (see /work/shared/reference/metrics.md): ground-truth regions are connected components,
all scores are sorted in descending order, per-pixel false-positive and per-region overlap increments are accumulated,
tied scores keep only the last point of their threshold, values are clipped to <= 1, (0,0) and (1,1) are added and the
curve is integrated with the trapezoid rule up to the FPR limit (interpolating linearly at the cut-off).

Grids and point clouds share one accumulation (`pro_curve_from_regions`); only the way regions are found differs:
`scipy.ndimage.label` with a 3x3 structure on grids, connected components of a kNN or radius graph on the anomalous
points of a cloud (`point_regions`). Region ids use one convention everywhere: -1 = normal, 0..R-1 = anomalous region.

Metrics whose state grows over samples are small classes with ``update``/``compute`` (anomalib style); every
``compute`` is a thin call of the function of the same name, which tests check directly.
"""

from __future__ import annotations

import math
from bisect import bisect
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from sklearn.metrics import roc_auc_score

__all__ = [
    "GridAUPRO",
    "ObjectAUROC",
    "PointAUPRO",
    "PointAUROC",
    "au_pro",
    "au_pro_points",
    "false_region_rate",
    "grid_regions",
    "markdown_table",
    "mean_table",
    "o_auroc",
    "p_auroc",
    "point_regions",
    "pro_curve",
    "pro_curve_from_regions",
    "pro_curve_points",
    "region_recall",
    "trapezoid",
]

# 8-connectivity on image grids, as in the official script.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------------------------
def grid_regions(ground_truth: np.ndarray) -> np.ndarray:
    """Region id per pixel of a 2-D ground-truth map (-1 = normal), 8-connected like MVTec's script."""
    gt = np.asarray(ground_truth)
    if gt.ndim != 2:
        raise ValueError(f"ground-truth map must be 2-D, got shape {gt.shape}")
    labeled, _ = ndimage.label(gt, structure=_EIGHT_CONNECTED)
    return labeled.astype(np.int64) - 1


def point_regions(
    points: np.ndarray, mask: np.ndarray, *, radius: float | None = None, k: int = 8
) -> np.ndarray:
    """Region id per point (-1 for normal points): connected components of the anomalous points.

    Two anomalous points are linked when one is among the other's ``k`` nearest neighbours *in the whole cloud*
    (so a band of normal points between two defects keeps them apart), or, when ``radius`` is given, when they are at
    most ``radius`` apart. Region ids are numbered 0..R-1 in order of each region's first point, so the result is
    deterministic. On a unit grid, ``radius=1.5`` reproduces 8-connectivity.
    """
    pts = _as_points(points, "points")
    anomalous = _as_mask(mask, len(pts), "mask")
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


# --------------------------------------------------------------------------------------------------------------
# PRO curve (shared exact accumulation)
# --------------------------------------------------------------------------------------------------------------
def pro_curve_from_regions(
    scores_list: Sequence[np.ndarray], regions_list: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (fpr, pro) from scores and region ids (-1 = normal) of every sample, pooled.

    Mirrors MVTec's script v2.0, including its float32 rounding of the FPR (counts are cast to float32 before the
    division): that is what makes our numbers equal the official ones to ~1e-12 rather than ~1e-8. The official
    script argsorts all scores and keeps the last point of each tie group; we sort the scores once and count what
    lies at or above each distinct score, which gives the same points (and sums the overlap increments in the same
    descending order) at a fraction of the memory traffic. Raises ValueError when the curve is undefined (no
    anomalous region or no normal element in the whole set).
    """
    if len(scores_list) != len(regions_list):
        raise ValueError(f"got {len(scores_list)} score arrays but {len(regions_list)} region arrays")
    if len(scores_list) == 0:
        raise ValueError("no samples given")

    flat_scores: list[np.ndarray] = []
    anomalous_scores: list[np.ndarray] = []
    anomalous_weights: list[np.ndarray] = []
    num_normal = 0
    num_regions = 0
    for index, (scores, regions) in enumerate(zip(scores_list, regions_list)):
        scores = np.asarray(scores, dtype=np.float64)
        regions = np.asarray(regions)
        if scores.shape != regions.shape:
            raise ValueError(f"sample {index}: scores shape {scores.shape} != regions shape {regions.shape}")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"sample {index}: scores contain NaN or inf")
        scores, regions = scores.ravel(), regions.ravel().astype(np.int64, copy=False)
        in_region = regions >= 0
        region_ids = regions[in_region]
        n_sample_regions = int(region_ids.max()) + 1 if region_ids.size else 0
        sizes = np.bincount(region_ids, minlength=n_sample_regions)
        if np.any(sizes == 0):
            raise ValueError(f"sample {index}: region ids must be 0..R-1 without gaps")
        flat_scores.append(scores)
        anomalous_scores.append(scores[in_region])
        # An element of a region raises that region's overlap by 1/size when the threshold passes it.
        anomalous_weights.append(1.0 / sizes[region_ids])
        num_normal += scores.size - region_ids.size
        num_regions += n_sample_regions
    if num_regions == 0:
        raise ValueError("PRO is undefined: no anomalous region in any sample")
    if num_normal == 0:
        raise ValueError("PRO is undefined: no normal element in any sample")

    # One curve point per distinct score t, in descending t, holding everything with score >= t: that is the official
    # "sort descending, cumsum, keep the last point of each tie group", computed without a full-size argsort.
    ascending = np.sort(np.concatenate(flat_scores))
    del flat_scores
    n_total = ascending.size
    is_group_start = np.empty(n_total, dtype=bool)
    is_group_start[0] = True
    np.not_equal(ascending[1:], ascending[:-1], out=is_group_start[1:])
    group_start = np.flatnonzero(is_group_start)
    del is_group_start
    thresholds = ascending[group_start]  # distinct scores, ascending
    del ascending
    n_at_or_above = n_total - group_start[::-1]  # descending thresholds from here on
    del group_start

    # Overlap increments are summed in descending score order, like the official cumsum (normal elements add 0.0).
    a_scores = np.concatenate(anomalous_scores)
    a_order = np.argsort(a_scores, kind="stable")[::-1]
    overlap_sum = np.concatenate(([0.0], np.cumsum(np.concatenate(anomalous_weights)[a_order])))
    anomalous_per_threshold = np.bincount(np.searchsorted(thresholds, a_scores), minlength=thresholds.size)
    n_anomalous_at_or_above = np.cumsum(anomalous_per_threshold[::-1])
    del thresholds, anomalous_per_threshold

    # float32 counts divided in float64 (numpy promotes against the int64 total) then stored as float32.
    false_positives = n_at_or_above - n_anomalous_at_or_above
    del n_at_or_above
    fpr = false_positives.astype(np.float32).astype(np.float64)
    del false_positives
    fpr /= num_normal
    fpr = fpr.astype(np.float32)
    pro = overlap_sum[n_anomalous_at_or_above]
    pro /= num_regions
    np.minimum(fpr, 1.0, out=fpr)
    np.minimum(pro, 1.0, out=pro)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under y(x) for ascending x up to ``x_max``, interpolating y linearly at the cut-off (MVTec style)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            insert_at = bisect(x, x_max)
            if not 0 < insert_at < len(x):
                raise ValueError(f"x_max={x_max} lies outside the curve's x range [{x.min()}, {x.max()}]")
            x0, x1, y0, y1 = x[insert_at - 1], x[insert_at], y[insert_at - 1], y[insert_at]
            y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            correction = 0.5 * (y_at_max + y0) * (x_max - x0)
        inside = x <= x_max
        x, y = x[inside], y[inside]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _area_under_pro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    return trapezoid(fpr, pro, x_max=fpr_limit) / fpr_limit


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def pro_curve(
    anomaly_maps: Sequence[np.ndarray], ground_truth_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (fpr, pro) over 2-D anomaly maps and their binary ground-truth maps."""
    if len(anomaly_maps) != len(ground_truth_maps):
        raise ValueError(
            f"got {len(anomaly_maps)} anomaly maps but {len(ground_truth_maps)} ground-truth maps"
        )
    return pro_curve_from_regions(list(anomaly_maps), [grid_regions(gt) for gt in ground_truth_maps])


def au_pro(
    anomaly_maps: Sequence[np.ndarray], ground_truth_maps: Sequence[np.ndarray], fpr_limit: float = 0.3
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` on image grids (1.0 = perfect).

    Returns nan (instead of raising) when no map has an anomalous region or no pixel is normal: a class without
    defective test samples then shows up as a gap in a table rather than aborting a whole benchmark run.
    """
    _check_fpr_limit(fpr_limit)
    regions = [grid_regions(gt) for gt in ground_truth_maps]
    if len(anomaly_maps) != len(regions):
        raise ValueError(f"got {len(anomaly_maps)} anomaly maps but {len(regions)} ground-truth maps")
    return _au_pro_from_regions(list(anomaly_maps), regions, fpr_limit)


def pro_curve_points(
    points_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    masks_list: Sequence[np.ndarray],
    *,
    radius: float | None = None,
    k: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (fpr, pro) over point clouds; regions as in `point_regions`."""
    return pro_curve_from_regions(*_scores_and_point_regions(points_list, scores_list, masks_list, radius, k))


def au_pro_points(
    points_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    masks_list: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    *,
    radius: float | None = None,
    k: int = 8,
) -> float:
    """AU-PRO over point clouds: the grid metric with regions = connected anomalous points (see `point_regions`).

    Returns nan when undefined (no anomalous region or no normal point in the set), like `au_pro`.
    """
    _check_fpr_limit(fpr_limit)
    scores, regions = _scores_and_point_regions(points_list, scores_list, masks_list, radius, k)
    return _au_pro_from_regions(scores, regions, fpr_limit)


def _au_pro_from_regions(scores: list[np.ndarray], regions: list[np.ndarray], fpr_limit: float) -> float:
    if len(scores) == 0:
        raise ValueError("no samples given")
    has_region = any(np.any(np.asarray(r) >= 0) for r in regions)
    has_normal = any(np.any(np.asarray(r) < 0) for r in regions)
    if not (has_region and has_normal):
        return math.nan
    fpr, pro = pro_curve_from_regions(scores, regions)
    return _area_under_pro(fpr, pro, fpr_limit)


def _scores_and_point_regions(
    points_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    masks_list: Sequence[np.ndarray],
    radius: float | None,
    k: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not len(points_list) == len(scores_list) == len(masks_list):
        raise ValueError(
            f"got {len(points_list)} point sets, {len(scores_list)} score arrays and {len(masks_list)} masks"
        )
    scores_out, regions_out = [], []
    for index, (points, scores, mask) in enumerate(zip(points_list, scores_list, masks_list)):
        pts = _as_points(points, f"sample {index} points")
        scores_out.append(_as_scores(scores, len(pts), f"sample {index} scores"))
        regions_out.append(
            point_regions(pts, _as_mask(mask, len(pts), f"sample {index} mask"), radius=radius, k=k)
        )
    return scores_out, regions_out


# --------------------------------------------------------------------------------------------------------------
# ROC AUC
# --------------------------------------------------------------------------------------------------------------
def o_auroc(object_scores: Sequence[float] | np.ndarray, object_labels: Sequence[int] | np.ndarray) -> float:
    """Object-level ROC AUC (label 1 = anomalous).

    Returns nan, not an error, when only one class is present: ROC AUC is undefined then, and a benchmark over many
    classes (or a small smoke subset) must still produce the rest of its table.
    """
    scores = np.asarray(object_scores, dtype=np.float64).ravel()
    labels = np.asarray(object_labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"got {scores.size} object scores but {labels.size} labels")
    return _auroc(scores, _binary(labels, "object labels"), "object scores")


def p_auroc(scores_list: Sequence[np.ndarray], masks_list: Sequence[np.ndarray]) -> float:
    """Point-level ROC AUC pooled over all points of all samples of a class.

    Returns nan when all pooled points are normal (or all anomalous): the AUC is undefined, see `o_auroc`.
    """
    if len(scores_list) != len(masks_list):
        raise ValueError(f"got {len(scores_list)} score arrays but {len(masks_list)} masks")
    if len(scores_list) == 0:
        raise ValueError("no samples given")
    scores, labels = [], []
    for index, (s, m) in enumerate(zip(scores_list, masks_list)):
        s = np.asarray(s, dtype=np.float64).ravel()
        labels.append(_as_mask(np.asarray(m).ravel(), s.size, f"sample {index} mask"))
        scores.append(s)
    return _auroc(np.concatenate(scores), np.concatenate(labels), "point scores")


def _auroc(scores: np.ndarray, labels: np.ndarray, what: str) -> float:
    if scores.size == 0:
        raise ValueError(f"no {what} given")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what} contain NaN or inf")
    if labels.min() == labels.max():
        return math.nan
    return float(roc_auc_score(labels, scores))


# --------------------------------------------------------------------------------------------------------------
# Region metrics for the agent
# --------------------------------------------------------------------------------------------------------------
def region_recall(
    points: np.ndarray,
    gt_mask: np.ndarray,
    flagged_mask: np.ndarray,
    *,
    min_overlap: int = 1,
    radius: float | None = None,
    k: int = 8,
) -> float:
    """Share of ground-truth regions with at least ``min_overlap`` flagged points (nan if there is no GT region).

    This is what "the agent found the defect" means: one hit per region counts, however large the region.
    """
    if min_overlap < 1:
        raise ValueError(f"min_overlap must be >= 1, got {min_overlap}")
    pts = _as_points(points, "points")
    flagged = _as_mask(flagged_mask, len(pts), "flagged_mask")
    regions = point_regions(pts, _as_mask(gt_mask, len(pts), "gt_mask"), radius=radius, k=k)
    n_regions = int(regions.max()) + 1
    if n_regions == 0:
        return math.nan
    hits = np.bincount(regions[flagged & (regions >= 0)], minlength=n_regions)
    return float(np.mean(hits >= min_overlap))


def false_region_rate(
    points: np.ndarray, gt_mask: np.ndarray, flagged_regions: Sequence[np.ndarray]
) -> float:
    """Share of flagged regions (arrays of point indices) that contain no GT-anomalous point (nan if none flagged).

    The counterpart of `region_recall`: how often the agent points at a place where nothing is wrong.
    """
    n_points = len(_as_points(points, "points"))
    anomalous = _as_mask(gt_mask, n_points, "gt_mask")
    if len(flagged_regions) == 0:
        return math.nan
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
    return false_count / len(flagged_regions)


# --------------------------------------------------------------------------------------------------------------
# Accumulating metric classes (one job each)
# --------------------------------------------------------------------------------------------------------------
class ObjectAUROC:
    """Object-level ROC AUC accumulated one scan at a time."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._scores: list[float] = []
        self._labels: list[int] = []

    def update(self, score: float, label: int | bool) -> None:
        self._scores.append(float(score))
        self._labels.append(int(label))

    def compute(self) -> float:
        return o_auroc(self._scores, self._labels)


class PointAUROC:
    """Point-level ROC AUC pooled over scans."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._scores: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []

    def update(self, scores: np.ndarray, mask: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        self._masks.append(_as_mask(np.asarray(mask).ravel(), scores.size, "mask"))
        self._scores.append(scores)

    def compute(self) -> float:
        return p_auroc(self._scores, self._masks)


class PointAUPRO:
    """Exact AU-PRO over point clouds; regions are found at ``update`` so only scores and region ids are kept."""

    def __init__(self, fpr_limit: float = 0.3, *, radius: float | None = None, k: int = 8) -> None:
        _check_fpr_limit(fpr_limit)
        self.fpr_limit, self.radius, self.k = fpr_limit, radius, k
        self.reset()

    def reset(self) -> None:
        self._scores: list[np.ndarray] = []
        self._regions: list[np.ndarray] = []

    def update(self, points: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> None:
        scores_list, regions_list = _scores_and_point_regions([points], [scores], [mask], self.radius, self.k)
        self._scores += scores_list
        self._regions += regions_list

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        return pro_curve_from_regions(self._scores, self._regions)

    def compute(self) -> float:
        return _au_pro_from_regions(self._scores, self._regions, self.fpr_limit)


class GridAUPRO:
    """Exact AU-PRO over 2-D anomaly maps (MVTec), accumulated one map at a time."""

    def __init__(self, fpr_limit: float = 0.3) -> None:
        _check_fpr_limit(fpr_limit)
        self.fpr_limit = fpr_limit
        self.reset()

    def reset(self) -> None:
        self._maps: list[np.ndarray] = []
        self._regions: list[np.ndarray] = []

    def update(self, anomaly_map: np.ndarray, ground_truth: np.ndarray) -> None:
        regions = grid_regions(ground_truth)
        anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
        if anomaly_map.shape != regions.shape:
            raise ValueError(f"anomaly map shape {anomaly_map.shape} != ground-truth shape {regions.shape}")
        self._maps.append(anomaly_map)
        self._regions.append(regions)

    def compute(self) -> float:
        return _au_pro_from_regions(self._maps, self._regions, self.fpr_limit)


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------
def mean_table(per_class: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of every metric over classes, ignoring nan (a class where the metric is undefined); nan if all are."""
    metrics: list[str] = []
    for row in per_class.values():
        metrics += [name for name in row if name not in metrics]
    means: dict[str, float] = {}
    for name in metrics:
        values = np.array([row[name] for row in per_class.values() if name in row], dtype=np.float64)
        finite = values[~np.isnan(values)]
        means[name] = float(finite.mean()) if finite.size else math.nan
    return means


def markdown_table(
    rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], digits: int = 3, *, index_name: str = ""
) -> str:
    """A GitHub markdown table: one row per key of ``rows``, values rounded to ``digits``; nan/missing -> "n/a"."""

    def cell(value: float | None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.{digits}f}"

    lines = [
        "| " + " | ".join([index_name, *columns]) + " |",
        "|" + "|".join([":---"] + ["---:"] * len(columns)) + "|",
    ]
    for name, row in rows.items():
        lines.append("| " + " | ".join([name, *(cell(row.get(c)) for c in columns)]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------
def _as_points(points: np.ndarray, what: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3) or len(pts) == 0:
        raise ValueError(f"{what} must be a non-empty (N, 3) or (N, 2) array, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"{what} contain NaN or inf")
    return pts


def _as_mask(mask: np.ndarray, n: int, what: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {arr.shape}")
    return _binary(arr, what)


def _binary(labels: np.ndarray, what: str) -> np.ndarray:
    if labels.dtype == bool:
        return labels
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError(f"{what} must be binary (0/1 or bool), got values {np.unique(labels)[:5]}")
    return labels.astype(bool)


def _as_scores(scores: np.ndarray, n: int, what: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {arr.shape}")
    return arr
