"""By-design features added to a scan: what an operator's "the bolt holes are by design" or "sharp ridges are
normal" refers to, with a per-point mask of where the feature is.

Why: guidance that names a normal feature can only be learned and measured on scans where such a feature
stands out. A part's own design features are in its fit, so the detector has learned them; a feature the fit
has never seen (a drilled variant, a stiffening rib) is what the detector flags and the operator then calls
normal. Two kinds, named as `agent.guidance.NORMAL_FEATURES` names them:
- "edges": a straight, sharp rib (a triangular profile raised out of the surface), which raises curvature and
  roughness as a crack or a bulge would;
- "holes": a row of three round through-holes of one radius, which leave the points around them sparse as a
  hole defect would.
They differ from the defects of `scans.defects` in regularity (straight, round, repeated), not in the
statistics they raise: telling them apart is the operator's job, and the guidance is how they say it.

Sizes are relative to the object (its largest bounding-box side), as for the defects; a feature is placed away
from the points in `avoid` (a defect's labels) so the two do not overlap. Deterministic by seed.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from scans.defects import _surface_curve, _tangent_basis, extent

FEATURE_KINDS: tuple[str, ...] = ("edges", "holes")
RIB_HEIGHT = 0.03  # of the object size: the rib's crest above the surface
RIB_SHARE = 0.025  # of the points: the rib's footprint
RIB_LENGTH = 0.35  # of the object size
HOLE_RADIUS = 0.03  # of the object size
HOLE_PITCH = 3.2  # hole centres are this many radii apart
HOLE_RING = 1.6  # points within this many radii of a hole's axis (and kept) are the feature's mask
AVOID_DISTANCE = 0.2  # of the object size: the feature's centre is at least this far from `avoid`


def _centre(points: np.ndarray, avoid: np.ndarray | None, size: float, rng: np.random.Generator) -> int:
    """A random point at least AVOID_DISTANCE x size from every avoided point (else the farthest one)."""
    if avoid is None or not avoid.any():
        return int(rng.integers(len(points)))
    distance, _ = cKDTree(points[avoid]).query(points)
    far = np.flatnonzero(distance >= AVOID_DISTANCE * size)
    return int(rng.choice(far)) if far.size else int(np.argmax(distance))


def _rib(
    points: np.ndarray,
    normals: np.ndarray,
    start: int,
    size: float,
    rng: np.random.Generator,
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """A straight rib; `scale` multiplies its height, length and footprint."""
    height, length, share = RIB_HEIGHT * scale[0], RIB_LENGTH * scale[1], RIB_SHARE * scale[2]
    tree = cKDTree(points)
    curve, curve_nearest = _surface_curve(points, normals, tree, start, length * size, 0.0, rng)
    distance, nearest_sample = cKDTree(curve).query(points)
    facing = np.einsum("ij,ij->i", normals, normals[curve_nearest[nearest_sample]]) > 0.3
    distance = np.where(facing, distance, np.inf)
    finite = np.flatnonzero(np.isfinite(distance))
    region = finite[np.argsort(distance[finite], kind="stable")[: round(share * len(points))]]
    width = float(distance[region].max()) if region.size else 0.0
    profile = 1.0 - distance[region] / max(width, 1e-12)  # triangular: a sharp crest
    moved = points.copy()
    moved[region] += (height * size * profile)[:, None] * normals[region]
    mask = np.zeros(len(points), dtype=bool)
    mask[region[profile > 0.1]] = True
    return moved, mask


def _holes(
    points: np.ndarray,
    normals: np.ndarray,
    start: int,
    size: float,
    rng: np.random.Generator,
    radius_scale: float = 1.0,
    count: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep-mask and feature mask (over the kept points) of `count` round holes along a tangent line."""
    tree = cKDTree(points)
    _, near = tree.query(points[start], k=min(30, len(points)))
    axis = normals[near].sum(axis=0)
    axis = normals[start] if np.linalg.norm(axis) < 1e-9 else axis / np.linalg.norm(axis)
    along = _tangent_basis(axis, rng)
    radius = HOLE_RADIUS * radius_scale * size
    removed = np.zeros(len(points), dtype=bool)
    ring = np.zeros(len(points), dtype=bool)
    for step in np.arange(count) - (count - 1) / 2:
        _, at = tree.query(points[start] + step * HOLE_PITCH * radius * along)
        offset = points - points[at]
        depth = offset @ axis
        across = np.linalg.norm(offset - depth[:, None] * axis, axis=1)
        through = np.abs(depth) < 0.5 * size  # a through-hole of a plate, a bore of a block
        removed |= through & (across < radius)
        ring |= through & (across < HOLE_RING * radius)
    keep = ~removed
    return keep, (ring & keep)[keep]


def add_feature(
    points: np.ndarray,
    normals: np.ndarray,
    kind: str,
    seed: int,
    *,
    labels: np.ndarray | None = None,
    scale: float | None = None,
    vary: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One by-design feature of `kind` on a scan: (points, feature mask, labels, normals), where `labels` (a
    defect's per-point labels, kept away from) follow the points that remain. `normals` are outward unit
    normals, one per point. `vary` > 0 draws each size from (1 - vary, 1 + vary) x its default and 2-4 holes
    instead of 3: shapes that a model tuned on the defaults has not seen."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; known: {', '.join(FEATURE_KINDS)}")
    points = np.asarray(points, dtype=np.float64)
    normals = np.asarray(normals, dtype=np.float64)
    labels = np.zeros(len(points), dtype=bool) if labels is None else np.asarray(labels, dtype=bool)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 200 or normals.shape != points.shape:
        raise ValueError(
            f"a feature needs (N>=200, 3) points and normals, got {points.shape}, {normals.shape}"
        )
    rng = np.random.default_rng(seed)
    size = extent(points) if scale is None else float(scale)
    start = _centre(points, labels, size, rng)
    factors = tuple(rng.uniform(1 - vary, 1 + vary, size=3)) if vary > 0 else (1.0, 1.0, 1.0)
    if kind == "edges":
        moved, mask = _rib(points, normals, start, size, rng, factors)
        return moved, mask & ~labels, labels, normals
    count = int(rng.integers(2, 5)) if vary > 0 else 3
    keep, mask = _holes(points, normals, start, size, rng, factors[0], count)
    return points[keep], mask & ~labels[keep], labels[keep], normals[keep]
