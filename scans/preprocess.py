"""Scan preprocessing that benchmarks expect before scoring: background-plane removal for MVTec 3D-AD.

Why: MVTec 3D-AD scans show the object lying on a flat support. That plane is most of the points, carries no
defects, and would dominate a memory bank of normal patches, so published methods (BTF, M3DM) fit the plane
with RANSAC and drop its points first. The caller applies the returned keep mask to the points *and* to any
per-point ground truth, so labels stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_DISTANCE_RATIO = 0.01  # plane inlier distance as a share of the scan's bounding-box diagonal
DEFAULT_BORDER_PIXELS = 10  # organized scans: fit the plane on this band along the image border (as BTF)


@dataclass(frozen=True, eq=False)
class PlaneRemoval:
    keep: np.ndarray  # bool (N,): True for points that are not on the background plane
    plane: np.ndarray  # float64 (4,): a, b, c, d with unit normal (a, b, c); a*x + b*y + c*z + d = 0
    distance_threshold: float  # absolute distance used, in the scan's units


def _border_rows(grid_shape: tuple[int, int], grid_index: np.ndarray, border: int) -> np.ndarray:
    """Indices of the points whose pixel lies within ``border`` pixels of the image edge."""
    height, width = grid_shape
    row, col = np.divmod(np.asarray(grid_index, dtype=np.int64), width)
    on_border = (row < border) | (row >= height - border) | (col < border) | (col >= width - border)
    return np.flatnonzero(on_border)


def remove_background_plane(
    points: np.ndarray,
    *,
    grid_shape: tuple[int, int] | None = None,
    grid_index: np.ndarray | None = None,
    distance_ratio: float = DEFAULT_DISTANCE_RATIO,
    border_pixels: int = DEFAULT_BORDER_PIXELS,
    num_iterations: int = 1000,
    seed: int = 0,
) -> PlaneRemoval:
    """Fit the dominant support plane with open3d RANSAC and mark the points off that plane.

    The distance threshold is ``distance_ratio`` times the bounding-box diagonal, so the same setting works
    whatever the scan's units (MVTec stores metres-scale values, user scans may be millimetres). For organized
    scans (``grid_shape`` and ``grid_index`` given) the plane is fitted on the image-border band only, because
    the object sits in the middle of the frame and could otherwise win the RANSAC vote when its top is flat.

    Determinism: open3d's RANSAC draws from its global generator, which we seed with
    ``open3d.utility.random.seed(seed)`` right before the call (segment_plane takes no seed argument).
    """
    import open3d as o3d  # heavy import, only needed here

    cloud = np.asarray(points, dtype=np.float64)
    if cloud.ndim != 2 or cloud.shape[1] != 3 or len(cloud) < 3:
        raise ValueError(f"points must have shape (N, 3) with N >= 3, got {cloud.shape}")
    if not distance_ratio > 0:
        raise ValueError(f"distance_ratio must be positive, got {distance_ratio}")
    diagonal = float(np.linalg.norm(cloud.max(axis=0) - cloud.min(axis=0)))
    threshold = distance_ratio * diagonal

    fit_rows = np.arange(len(cloud))
    if grid_shape is not None and grid_index is not None:
        if len(grid_index) != len(cloud):
            raise ValueError(f"grid_index has {len(grid_index)} entries for {len(cloud)} points")
        border = _border_rows(grid_shape, grid_index, border_pixels)
        if len(border) >= 3:
            fit_rows = border

    o3d.utility.random.seed(int(seed))
    fit_cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(cloud[fit_rows]))
    model, _ = fit_cloud.segment_plane(
        distance_threshold=threshold, ransac_n=3, num_iterations=num_iterations
    )
    plane = np.asarray(model, dtype=np.float64).reshape(4)
    plane = plane / np.linalg.norm(plane[:3])
    distance = np.abs(cloud @ plane[:3] + plane[3])
    return PlaneRemoval(keep=distance > threshold, plane=plane, distance_threshold=threshold)
