"""Registration to a class template and the bank of registered coordinates (Reg3D-AD's second memory bank).

Why: the Point-MAE bank compares patches by features that also encode where a patch sits on the part, and the
bank
is filled from the templates' poses. Scans that are not pre-aligned (Real3D-AD's test scans come in arbitrary
poses)
therefore look anomalous everywhere. With ``DetectorConfig(register=True)`` every scan, training and test, is
first
aligned rigidly to one reference template (FPFH + RANSAC + point-to-plane ICP,
:func:`tools.geometry.register`), and
the detector keeps a second bank: the registered training points themselves. A test patch's coordinate score
is the
mean distance of its points to the nearest registered training point: a dent or a bulge moves points off the
normal
surface even where its features look ordinary.

Both banks are searched per patch, so a subset of patches costs in proportion to its size, as the verifier
needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scans.geometry import register, voxel_downsample

# Registration voxel as a share of the class scale (the mean radius of the normalised part). Coarse enough
# that
# FPFH + RANSAC take a few seconds on a 30k-point scan, fine enough that ICP ends within a sampling step.
REGISTER_VOXEL_SHARE = 0.05
# Voxel of the coordinate bank as a share of the class scale: keeps the bank near the templates' own spacing
# (a 30k-point part of scale 1 has ~0.01-0.02 between neighbours) without storing every point of every
# template.
COORD_VOXEL_SHARE = 0.01
RANSAC_ITERATIONS = 50_000
# Below this fitness the alignment is doubtful: fewer than half of the scan's points found a reference point
# nearby,
# or fewer than half of the reference's points found a scan point (a line, a fragment or another part "fits"
# one way).
MIN_FITNESS = 0.5


class RegistrationError(ValueError):
    """A scan cannot be aligned onto the class template at all (too few points or no structure at its voxel
    size)."""


@dataclass(frozen=True, eq=False)
class Alignment:
    """How one scan was moved onto the reference: registered = points @ rotation.T + translation."""

    transform: np.ndarray  # float64 (4,4)
    fitness: float  # the smaller of: share of scan points with a reference point within 1.5 voxels after
    # the move, and share of reference points with a moved scan point within 1.5 voxels
    # float32 (N,) each moved point's distance to the nearest reference point: measured for the fitness
    # anyway, and
    # the verbalizer's template_distance (None for IDENTITY)
    template_distance: np.ndarray | None = None

    def apply(self, points: np.ndarray) -> np.ndarray:
        t = self.transform
        return (np.asarray(points, dtype=np.float64) @ t[:3, :3].T + t[:3, 3]).astype(np.float32)

    def undo(self, points: np.ndarray) -> np.ndarray:
        t = self.transform
        return ((np.asarray(points, dtype=np.float64) - t[:3, 3]) @ t[:3, :3]).astype(np.float32)

    @property
    def doubtful(self) -> bool:
        return self.fitness < MIN_FITNESS


IDENTITY = Alignment(np.eye(4), 1.0)


def align(points: np.ndarray, reference: np.ndarray, scale: float, seed: int = 0) -> Alignment:
    """Rigid alignment of ``points`` onto ``reference`` (both in the input's units; ``scale`` is the class
    scale).

    Raises RegistrationError when the scan is too small or too degenerate to be registered at the class's
    voxel."""
    from scipy.spatial import cKDTree

    voxel = REGISTER_VOXEL_SHARE * scale
    try:
        transform, _ = register(points, reference, voxel, seed=seed, ransac_iterations=RANSAC_ITERATIONS)
    except ValueError as exc:
        raise RegistrationError(
            "cannot be registered to the class template: too few points or too little "
            f"structure at the registration voxel {voxel:.3g} (5% of the class scale)"
        ) from exc
    moved = Alignment(transform, 1.0).apply(points)
    reach = 1.5 * voxel
    to_reference = cKDTree(reference).query(moved, k=1)[0].astype(np.float32)
    forward = float(np.mean(to_reference <= reach))
    backward = float(np.mean(cKDTree(moved).query(reference, k=1)[0] <= reach))
    return Alignment(transform, min(forward, backward), to_reference)


class CoordinateBank:
    """Registered training points; a patch's score is the mean distance of its points to the nearest of
    them."""

    def __init__(self, points: np.ndarray, source: np.ndarray) -> None:
        self.points = np.ascontiguousarray(points, dtype=np.float32)
        self.source = np.asarray(
            source, dtype=np.int64
        )  # which template each point came from (for calibration)
        if self.points.ndim != 2 or self.points.shape[1] != 3 or len(self.points) != len(self.source):
            raise ValueError(
                f"coordinate bank needs (N,3) points and N sources, got {self.points.shape} and "
                f"{self.source.shape}"
            )
        self._index = None  # a KD-tree, built on first use

    @classmethod
    def from_templates(cls, registered: list[np.ndarray], scale: float) -> CoordinateBank:
        """Voxel-downsampled union of the registered templates, each point tagged with its template."""
        voxel = COORD_VOXEL_SHARE * scale
        kept = [np.asarray(t, dtype=np.float32)[voxel_downsample(t, voxel)] for t in registered]
        return cls(np.concatenate(kept), np.concatenate([np.full(len(k), i) for i, k in enumerate(kept)]))

    def __len__(self) -> int:
        return len(self.points)

    def _tree(self):
        from scipy.spatial import cKDTree

        if self._index is None:
            self._index = cKDTree(
                self.points
            )  # exact, and far cheaper than a flat search in three dimensions
        return self._index

    def point_distances(self, points: np.ndarray) -> np.ndarray:
        """float32 (N,) distance of each (registered) point to the nearest registered training point."""
        if len(points) == 0:
            return np.zeros(0, dtype=np.float32)
        return self._tree().query(np.asarray(points, dtype=np.float32), k=1)[0].astype(np.float32)

    def patch_scores(self, registered_points: np.ndarray, group_idx: np.ndarray) -> np.ndarray:
        """float32 (G,) mean nearest-point distance over each patch's member points."""
        members = np.asarray(group_idx, dtype=np.int64)
        if members.size == 0:
            return np.zeros(len(members), dtype=np.float32)
        dist = self.point_distances(registered_points[members.ravel()])
        return dist.reshape(members.shape).mean(axis=1).astype(np.float32)

    def leave_one_out_patch_scores(
        self, registered: list[np.ndarray], group_idx: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Per template: its patches' scores against the bank points from the *other* templates (normal data,
        as
        a normal test scan sees the bank). NaN when the bank holds no other template."""
        from scipy.spatial import cKDTree

        out = []
        for template, (points, members) in enumerate(zip(registered, group_idx)):
            members = np.asarray(members, dtype=np.int64)
            others = self.points[self.source != template]
            if len(others) == 0:
                out.append(np.full(len(members), np.nan, dtype=np.float32))
                continue
            dist = cKDTree(others).query(np.asarray(points, dtype=np.float32)[members.ravel()], k=1)[0]
            out.append(dist.reshape(members.shape).mean(axis=1).astype(np.float32))
        return out
