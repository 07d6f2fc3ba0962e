"""Surface patches: the unit the agent talks about.

A scan of any size is cut into a few dozen to a few hundred patches so that one line of text per patch fits an
LLM
prompt. Centres come from farthest-point sampling (even coverage of the surface, unlike random or voxel
centres) run on a
seeded random downsample, because FPS is O(n * P) and a 500k-point scan does not need every point to place 100
centres.
Every point is then assigned to its nearest centre (a Voronoi partition of the surface).

Patch ids are stable: they follow a Morton (z-order) sort of the centres on a fixed grid in the scan's
normalised box,
so neighbouring patches tend to get nearby ids, and the same points in the same order with the same seed
always yield
the same patches and ids.

`PatchTable` (the per-patch descriptors) lives here as a plain container so that `tools.agent_tools` can read
it without
importing `verbalize` (imports only point down); `verbalize.describe` is what fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scans.geometry import fps, knn

FPS_SAMPLE_CAP = 10_000  # FPS runs on at most this many randomly chosen points
MIN_POINTS_PER_PATCH = 16  # a patch needs a few points for a plane fit / curvature to mean anything
MIN_PATCHES = 4
MAX_PATCHES = 512
_MORTON_BITS = 10  # 1024 cells per axis for the id sort


@dataclass(frozen=True)
class Patches:
    """A partition of the scan's points into patches. Ids are 0..P-1 (rows of `centers`)."""

    centers: np.ndarray  # float32 (P, 3) in the scan's own coordinates (each centre is one of the points)
    patch_of_point: np.ndarray  # int64 (N,) patch id of every point
    counts: np.ndarray  # int64 (P,) points per patch, all >= 1

    @property
    def n_patches(self) -> int:
        return int(self.centers.shape[0])

    @property
    def n_points(self) -> int:
        return int(self.patch_of_point.shape[0])

    def points_of(self, patch_ids: int | list[int] | np.ndarray) -> np.ndarray:
        """Indices (ascending) of the points that belong to any of `patch_ids`."""
        ids = np.atleast_1d(np.asarray(patch_ids, dtype=np.int64))
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_patches):
            raise ValueError(f"patch ids must be in 0..{self.n_patches - 1}, got {ids.tolist()}")
        return np.flatnonzero(np.isin(self.patch_of_point, ids))


@dataclass(frozen=True)
class Normalisation:
    """Maps scan coordinates to the normalised box: (p - center) / scale lies in [-1, 1]^3."""

    center: np.ndarray  # float64 (3,) bounding-box centre in scan units
    scale: float  # half of the largest bounding-box side, in scan units
    extent: np.ndarray  # float64 (3,) bounding-box side lengths in scan units
    n_points: int

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.center) / self.scale


@dataclass
class PatchTable:
    """Per-patch descriptors: one float array (P,) per column; row i describes patch `ids[i]` (== i).

    `column_info` says in one short phrase what each column holds (rendered into the prompt's legend).
    `stat_names` are the learned per-point statistics that were aggregated (may be empty: zero-shot).
    `shape` holds descriptors of the off-normal surface around each patch (`verbalize.shape`), not rendered:
    what the learned normal-feature recogniser reads beside the columns (empty without surface cues).
    """

    columns: dict[str, np.ndarray]
    ids: np.ndarray
    normalisation: Normalisation
    stat_names: tuple[str, ...] = ()
    column_info: dict[str, str] = field(default_factory=dict)
    shape: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_patches(self) -> int:
        return int(self.ids.shape[0])

    def row(self, patch_id: int) -> dict[str, float]:
        return {name: float(values[patch_id]) for name, values in self.columns.items()}


def _morton_keys(unit_coords: np.ndarray) -> np.ndarray:
    """Interleave the bits of coordinates quantised from [0, 1] to 2**_MORTON_BITS cells."""
    cells = np.clip((unit_coords * (2**_MORTON_BITS - 1)).round(), 0, 2**_MORTON_BITS - 1).astype(np.uint64)
    keys = np.zeros(len(cells), dtype=np.uint64)
    for bit in range(_MORTON_BITS):
        for axis in range(3):
            keys |= ((cells[:, axis] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(3 * bit + axis)
    return keys


def adaptive_patch_count(
    n_points: int, budget: int, *, tokens_per_row: int = 40, reserved_tokens: int = 600
) -> int:
    """How many patches a scan should get so that one table row per patch fits `budget` tokens.

    `tokens_per_row` is the estimated cost of one rendered row (about 40 for the default columns with three
    learned
    statistics, see verbalize.render); `reserved_tokens` covers the header, legend and guidance. The count is
    also capped
    so that patches keep at least MIN_POINTS_PER_PATCH points. The renderer still coarsens if a table comes
    out longer.
    """
    if n_points < 1:
        raise ValueError(f"adaptive_patch_count needs at least one point, got {n_points}")
    if budget <= 0 or tokens_per_row <= 0:
        raise ValueError(f"budget and tokens_per_row must be positive, got {budget} and {tokens_per_row}")
    by_budget = max(MIN_PATCHES, (budget - reserved_tokens) // tokens_per_row)
    by_points = max(1, n_points // MIN_POINTS_PER_PATCH)
    return int(max(1, min(by_budget, by_points, MAX_PATCHES, n_points)))


def build_patches(points: np.ndarray, n_patches: int, seed: int = 0) -> Patches:
    """Partition `points` (N, 3) into at most `n_patches` patches (fewer when the scan has fewer distinct
    points)."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"build_patches needs points of shape (N, 3) with N >= 1, got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("build_patches needs finite points (validate the scan with tools.io first)")
    if n_patches < 1:
        raise ValueError(f"n_patches must be >= 1, got {n_patches}")
    points32 = points.astype(np.float32, copy=False)
    rng = np.random.default_rng(seed)
    n = len(points32)
    sample = np.sort(rng.choice(n, FPS_SAMPLE_CAP, replace=False)) if n > FPS_SAMPLE_CAP else np.arange(n)
    n_centres = min(n_patches, len(sample))
    centre_idx = sample[np.asarray(fps(points32[sample], n_centres, seed), dtype=np.int64)]
    centres = points32[centre_idx]
    centres = np.unique(centres, axis=0)  # duplicate points can only yield duplicate centres; drop them

    _, nearest = knn(centres, points32, 1)
    patch_of_point = np.asarray(nearest, dtype=np.int64).reshape(n)
    counts = np.bincount(patch_of_point, minlength=len(centres))
    keep = counts > 0
    centres = centres[keep]

    lo, hi = points32.min(axis=0).astype(np.float64), points32.max(axis=0).astype(np.float64)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    order = np.lexsort((np.arange(len(centres)), _morton_keys((centres - lo) / span)))
    old_to_new = np.full(len(keep), -1, dtype=np.int64)
    old_to_new[np.flatnonzero(keep)[order]] = np.arange(len(order))
    patch_of_point = old_to_new[patch_of_point]
    centres = centres[order]
    return Patches(
        centers=np.ascontiguousarray(centres, dtype=np.float32),
        patch_of_point=patch_of_point,
        counts=np.bincount(patch_of_point, minlength=len(centres)).astype(np.int64),
    )
