"""How a scan becomes Point-MAE patches, in numpy: normalisation by the class scale, the density subsample,
farthest point sampling + kNN grouping, and the masks of the reconstruction rounds.

Training (detector.pointmae on torch batches) and inference (detector.features, torch-free) both group here,
so a patch means the same thing in both. Scale conventions (why they matter): a class has a known physical
size, so points are centred per scan and divided by one class-level ``scale`` (:func:`estimate_scale`) instead
of being fitted into a unit sphere per scan. Patch *scale* is fixed by point density: a scan is randomly
subsampled to ``num_groups * group_size / PATCH_OVERLAP`` points before grouping, and training crops use the
same density (detector.pointmae_train), so a patch at inference covers the same surface extent as in training.
"""

from __future__ import annotations

import math

import numpy as np

from scans.geometry import fps, knn

PATCH_OVERLAP = 2  # points in patches / points sampled: each sampled point is covered by ~2 patches


def estimate_scale(scans: list[np.ndarray]) -> float:
    """Class-level scale: mean distance of a point to its scan's centroid, averaged over the templates."""
    if not scans:
        raise ValueError("estimate_scale: no scans given")
    radii = [float(np.linalg.norm(s - s.mean(axis=0), axis=1).mean()) for s in scans]
    scale = float(np.mean(radii))
    if not scale > 0:
        raise ValueError("estimate_scale: scans have zero extent")
    return scale


def normalise_points(points: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre on the centroid and divide by the class scale. Returns (normalised float32, centroid
    float64)."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    centroid = points.astype(np.float64).mean(axis=0)
    return ((points - centroid) / scale).astype(np.float32), centroid


def group_scan(
    xyz: np.ndarray, num_groups: int, group_size: int, start: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """FPS centres + kNN patches of one point set (N,3).

    Returns (neighborhood (G,K,3) relative to its centre, centres (G,3), member idx (G,K) nearest first,
    centre idx (G,))."""
    pts = np.asarray(xyz, dtype=np.float32)
    center_idx = fps(pts, num_groups, start=start)
    centers = pts[center_idx]
    idx = knn(pts, centers, group_size)[1].astype(np.int64).reshape(num_groups, group_size)
    neighborhood = pts[idx] - centers[:, None, :]
    return neighborhood, centers, idx, center_idx


def covering_masks(groups: int, ratio: float, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """(rounds,G) bool masks that together hide every patch at least once, each hiding the same number.

    Patches are put in a random order and round r hides a cyclic window of that order starting at r*G/rounds;
    the window is max(ratio*G, G/rounds) long, so consecutive windows touch and the union is everything."""
    if rounds < 1:
        raise ValueError("covering_masks: rounds must be >= 1")
    m = min(max(round(ratio * groups), math.ceil(groups / rounds), 1), groups - 1)
    perm = rng.permutation(groups)
    masks = np.zeros((rounds, groups), dtype=bool)
    for r in range(rounds):
        masks[r, perm[(np.arange(m) + (r * groups) // rounds) % groups]] = True
    if rounds * m < groups or not masks.any(axis=0).all():
        raise ValueError(f"{rounds} rounds with mask ratio {ratio} cannot cover all {groups} patches")
    return masks
