"""Isolated far outliers: single stray points far outside the part, found with a robust scale and dropped.

Why: scanners emit the odd stray return (a reflection, a glitch at 1e6 or 3e37). One such point moves the
centroid and the mean radius of a 50-unit part by orders of magnitude, so the scan was refused as "another
class" and, in the zero-shot mode, every patch looked normal next to it. The part's size is therefore measured
robustly (median centre, median distance to it: a few stray points cannot move either), and a point is dropped
only when it is both *far* (beyond FAR_FACTOR robust radii, well outside any compact or elongated part) and
*isolated* (fewer than ISOLATED_BELOW points within one robust radius of it), so a far cluster of real points
is kept and judged downstream.
"""

from __future__ import annotations

import numpy as np

FAR_FACTOR = 10.0        # far: farther than this many robust radii from the robust centre
ISOLATED_BELOW = 8       # isolated: fewer points than this (itself included) within one robust radius
SCALE_SAMPLE = 200_000   # rows the robust centre and radius are measured on (a seeded sample of larger scans)
_CHUNK = 1_000_000       # rows per block when measuring every point's distance (bounded temporary memory)


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def robust_centre_radius(points: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """(per-axis median of the points, median distance to it), on a seeded sample of <= SCALE_SAMPLE rows."""
    sample = np.asarray(points[_sample_rows(len(points), SCALE_SAMPLE, seed)], dtype=np.float64)
    centre = np.median(sample, axis=0)
    radius = float(np.median(np.linalg.norm(sample - centre, axis=1)))
    return centre, radius


def distances_to(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """float64 (N,) distance of every point to ``centre``, computed block by block."""
    out = np.empty(len(points), dtype=np.float64)
    for start in range(0, len(points), _CHUNK):
        block = np.asarray(points[start:start + _CHUNK], dtype=np.float64)
        out[start:start + len(block)] = np.linalg.norm(block - centre, axis=1)
    return out


def find_far_outliers(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """Sorted int64 rows of the isolated far outliers of ``points`` (N, 3); empty when there are none."""
    from scipy.spatial import cKDTree

    centre, radius = robust_centre_radius(points, seed)
    if not radius > 0:  # more than half the points coincide: no scale to judge "far" by
        return np.zeros(0, dtype=np.int64)
    distance = distances_to(points, centre)
    far = np.flatnonzero(distance > FAR_FACTOR * radius)
    if far.size == 0:
        return far.astype(np.int64)
    # a far point's neighbours within one radius are themselves beyond FAR_FACTOR - 1 radii: search only those
    nearby = np.flatnonzero(distance > (FAR_FACTOR - 1.0) * radius)
    tree = cKDTree(np.asarray(points[nearby], dtype=np.float64))
    counts = tree.query_ball_point(np.asarray(points[far], dtype=np.float64), r=radius, return_length=True)
    return far[np.asarray(counts) < ISOLATED_BELOW].astype(np.int64)


def robust_radius_mean(points: np.ndarray, seed: int = 0) -> float:
    """Mean distance to the centroid of the points within FAR_FACTOR robust radii (on a seeded sample): the
    class scale's measure (detector.pointmae.estimate_scale), blind to far points whether isolated or not."""
    sample = np.asarray(points[_sample_rows(len(points), SCALE_SAMPLE, seed)], dtype=np.float64)
    centre, radius = robust_centre_radius(sample, seed)
    if radius > 0:
        sample = sample[np.linalg.norm(sample - centre, axis=1) <= FAR_FACTOR * radius]
    return float(np.linalg.norm(sample - sample.mean(axis=0), axis=1).mean())
