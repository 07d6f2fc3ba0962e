"""BTF baseline features ("Back to the Feature", Horwitz & Hoshen 2023): hand-crafted FPFH descriptors pooled
per
patch, scored by the same PatchCore memory bank as the learned Point-MAE features.

BTF computes FPFH on the raw scan and average-pools it over image patches of MVTec's organised grid. Scans
here are
unorganised, so a patch is what the Point-MAE detector uses instead: an FPS centre plus its kNN group. That
keeps
the two feature kinds interchangeable in the detector (same centres, same group shape, same interpolation back
to
points) and makes the comparison about the descriptor alone.

Scale: the scan is centred on its centroid and divided by the class-level `scale`
(tools.pointmae.estimate_scale:
mean point distance to the centroid over the training scans), exactly like the Point-MAE path, so one set of
radii
serves every class. In those units (a typical part has mean radius 1):
    voxel          = 0.03   downsampling cell before FPFH (a 30k-point bunny scan keeps ~11k points)
    radius_normal  = 2 * voxel = 0.06   normals, as in BTF and open3d's registration recipe
    radius_feature = 5 * voxel = 0.15   FPFH support, about one detector patch across at 512 groups
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from scans.geometry import fpfh, fps, knn, voxel_downsample

__all__ = ["DEFAULT_VOXEL", "BTFPatches", "btf_patch_features", "btf_point_features"]

DEFAULT_VOXEL = 0.03  # in class-scale units (see module docstring)


class BTFPatches(NamedTuple):
    """Unpacks as (centers, group_idx, features)."""

    centers: np.ndarray  # float32 (G, 3) FPS centres in the input's coordinates
    group_idx: np.ndarray  # int64 (G, K) indices into the input points
    features: np.ndarray  # float32 (G, 33) mean FPFH of the group's points


def _normalise(points: np.ndarray, scale: float) -> np.ndarray:
    if not scale > 0:
        raise ValueError(f"btf: scale must be positive, got {scale}")
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"btf: expected (N, 3) points, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("btf: points contain NaN or infinite coordinates")
    return (pts - pts.mean(axis=0)) / scale


def btf_point_features(points: np.ndarray, *, scale: float, voxel: float = DEFAULT_VOXEL) -> np.ndarray:
    """FPFH (N, 33) float32 for every input point.

    FPFH is computed once on the voxel-downsampled scan (radii 2 and 5 voxels, in class-scale units) and each
    input
    point takes the descriptor of its nearest kept point: the cost follows the surface area, not the point
    count.
    """
    norm = _normalise(points, scale)
    kept = voxel_downsample(norm, voxel)
    if len(kept) < 3:
        raise ValueError(
            f"btf: voxel={voxel} leaves {len(kept)} points; the scan is too small for this scale"
        )
    desc = fpfh(norm[kept], radius_normal=2 * voxel, radius_feature=5 * voxel)
    _, nearest = knn(norm[kept], norm, 1)
    return desc[nearest[:, 0]]


def btf_patch_features(
    points: np.ndarray,
    *,
    num_groups: int,
    group_size: int,
    scale: float,
    seed: int = 0,
    voxel: float = DEFAULT_VOXEL,
) -> BTFPatches:
    """BTF patch features of one scan: FPS centres (seeded), kNN groups of `group_size`, mean FPFH per group.

    num_groups / group_size should be the detector's (Point-MAE) values so both feature kinds patch alike.
    """
    pts = np.asarray(points)
    if not 1 <= group_size <= len(pts):
        raise ValueError(
            f"btf: group_size={group_size} must be between 1 and the number of points ({len(pts)})"
        )
    if not 1 <= num_groups <= len(pts):
        raise ValueError(
            f"btf: num_groups={num_groups} must be between 1 and the number of points ({len(pts)})"
        )
    per_point = btf_point_features(pts, scale=scale, voxel=voxel)
    centre_idx = fps(pts, num_groups, seed=seed)
    _, group_idx = knn(pts, pts[centre_idx], group_size)
    features = per_point[group_idx].mean(axis=1, dtype=np.float64).astype(np.float32)
    return BTFPatches(
        centers=pts[centre_idx].astype(np.float32), group_idx=group_idx.astype(np.int64), features=features
    )
