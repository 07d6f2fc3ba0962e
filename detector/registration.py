"""Registration to a class template and the bank of registered coordinates (Reg3D-AD's second memory bank).

Why: the Point-MAE bank compares patches by features that also encode where a patch sits on the part, and the
bank
is filled from the templates' poses. Scans that are not pre-aligned (Real3D-AD's test scans come in arbitrary
poses)
therefore look anomalous everywhere. With ``DetectorConfig(register=True)`` every scan, training and test, is
first
aligned rigidly to one reference template (coarse-to-fine point-to-plane ICP, with FPFH + RANSAC as the global
step when ICP alone is not confident; :func:`align`), and
the detector keeps a second bank: the registered training points themselves. A test patch's coordinate score
is the
mean distance of its points to the nearest registered training point: a dent or a bulge moves points off the
normal
surface even where its features look ordinary.

Both banks are searched per patch, so a subset of patches costs in proportion to its size, as the verifier
needs.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

import numpy as np

from scans.geometry import (
    KNN_WORKERS,
    fpfh,
    icp_point_to_plane,
    register_global,
    surface_normals,
    voxel_downsample,
)

# Registration voxel as a share of the class scale (the mean radius of the normalised part): the coarse level
# of ICP and the level FPFH + RANSAC work at, fine enough that the global step's pose lies in ICP's basin.
REGISTER_VOXEL_SHARE = 0.05
# The fine ICP level: about twice the coordinate bank's spacing, so the last refinement sees the surface's
# shape at the resolution the banks compare it, not the coarse level's.
FINE_VOXEL_SHARE = 0.02
# Voxel of the coordinate bank as a share of the class scale: keeps the bank near the templates' own spacing
# (a 30k-point part of scale 1 has ~0.01-0.02 between neighbours) without storing every point of every
# template.
COORD_VOXEL_SHARE = 0.01
# The global step's RANSAC rounds (iterations each, a fresh seed each): it stops after the first round whose
# pose is confident (EARLY_STOP_SHARE) or agrees with the best pose so far (two independent starts meeting
# is as good a sign as any); a part whose symmetry or noise keeps every round doubtful gets them all and the
# best pose of any of them, a little more than one round of the former 50,000.
GLOBAL_ROUNDS = (2_000, 10_000, 50_000)
# Below this fitness the alignment is doubtful: fewer than half of the scan's points found a reference point
# nearby,
# or fewer than half of the reference's points found a scan point (a line, a fragment or another part "fits"
# one way).
MIN_FITNESS = 0.5
# Early stop of the global step: a pose found by ICP alone from where the scan lies is kept without FPFH +
# RANSAC when both the fitness and the share of scan points close to the reference (within half a coarse
# voxel plus 1.5 times the reference's own point spacing) reach this share. A pose a few degrees off keeps a
# high fitness at the fitness's generous reach but loses the close points on every rim, so the close share
# is what tells a converged pose from a nearby local minimum; anything less sends the scan through the
# global step too, and the better pose wins.
EARLY_STOP_SHARE = 0.9
CLOSE_REACH_VOXELS = 0.5
CLOSE_REACH_SPACINGS = 1.5
# Scan points in the wide first ICP pass (it only has to reach the basin of the tight passes) and in the fine
# pass (where more points average the sensor noise out of the pose): ICP's cost is per source point, while
# its accuracy comes mostly from the dense target.
WIDE_ICP_POINTS = 1500
FINE_ICP_POINTS = 10_000


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
    # how the pose was found: "icp" (the early stop: ICP alone was confident) or "global" (FPFH + RANSAC,
    # then ICP; chosen when the ICP-only pose was doubtful, or when it was not better)
    method: str = "identity"

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


@dataclass(eq=False)
class RegistrationTarget:
    """The reference template with everything registration needs from it, computed once per fit (and once
    per loaded fit) instead of once per scan: its KD-tree, its coarse and fine levels with normals, and its
    FPFH descriptors (built on the first scan that needs the global step)."""

    points: np.ndarray  # float32 (M,3) the reference (the first template at the coordinate bank's voxel)
    scale: float
    tree: object = field(init=False, repr=False)  # scipy cKDTree of points
    coarse: np.ndarray = field(init=False, repr=False)  # float64 (Mc,3) at REGISTER_VOXEL_SHARE
    coarse_normals: np.ndarray = field(init=False, repr=False)
    coarse_tree: object = field(init=False, repr=False)
    fine: np.ndarray = field(init=False, repr=False)  # float64 (Mf,3) at FINE_VOXEL_SHARE
    fine_normals: np.ndarray = field(init=False, repr=False)
    fine_tree: object = field(init=False, repr=False)
    spacing: float = field(init=False, repr=False)  # median distance between neighbouring reference points
    # the levels and spacing as a fitted folder stores them (see `prepared`); None = compute them here
    stored: InitVar[dict[str, np.ndarray] | None] = None
    _fpfh: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self, stored: dict[str, np.ndarray] | None) -> None:
        from scipy.spatial import cKDTree

        self.points = np.ascontiguousarray(self.points, dtype=np.float32)
        self.tree = cKDTree(self.points)
        if stored is not None:
            self._take(stored)
        else:
            self.spacing = (
                float(np.median(self.tree.query(self.points, k=2)[0][:, 1])) if len(self.points) > 1 else 0.0
            )
            self.coarse = self.level(self.points, REGISTER_VOXEL_SHARE)
            self.fine = self.level(self.points, FINE_VOXEL_SHARE)
        if len(self.coarse) < 3:
            raise RegistrationError(
                f"the class template has {len(self.coarse)} points at the registration voxel "
                f"{self.voxel:.3g}: too few to register onto"
            )
        if stored is None:
            self.coarse_normals = surface_normals(self.coarse)
            self.fine_normals = surface_normals(self.fine)
        self.coarse_tree, self.fine_tree = cKDTree(self.coarse), cKDTree(self.fine)

    def prepared(self) -> dict[str, np.ndarray]:
        """What a fitted folder stores so that loading it skips the normals (most of preparing the target)."""
        return {
            "coarse": self.coarse,
            "coarse_normals": self.coarse_normals,
            "fine": self.fine,
            "fine_normals": self.fine_normals,
            "spacing": np.array([self.spacing]),
        }

    def _take(self, stored: dict[str, np.ndarray]) -> None:
        """Use stored levels after checking their shapes (ValueError names the array)."""
        for level in ("coarse", "fine"):
            points, normals = stored.get(level), stored.get(f"{level}_normals")
            for name, array in ((level, points), (f"{level}_normals", normals)):
                if (
                    not isinstance(array, np.ndarray)
                    or array.ndim != 2
                    or array.shape[1:] != (3,)
                    or not np.isfinite(array).all()
                ):
                    raise ValueError(f"registration level {name} is missing or not a finite (M, 3) array")
            if normals.shape != points.shape:  # type: ignore[union-attr]
                raise ValueError(
                    f"registration level {level}: {len(normals)} normals for {len(points)} points"
                )
        spacing = np.asarray(stored.get("spacing", []), dtype=np.float64).reshape(-1)
        if spacing.shape != (1,) or not (np.isfinite(spacing[0]) and spacing[0] >= 0):
            raise ValueError("registration spacing is missing or invalid")
        self.coarse = stored["coarse"].astype(np.float64)
        self.fine = stored["fine"].astype(np.float64)
        self.coarse_normals = stored["coarse_normals"].astype(np.float64)
        self.fine_normals = stored["fine_normals"].astype(np.float64)
        self.spacing = float(spacing[0])

    @property
    def voxel(self) -> float:
        return REGISTER_VOXEL_SHARE * self.scale

    def level(self, points: np.ndarray, share: float) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64)
        return pts[voxel_downsample(pts, share * self.scale)]

    def fpfh(self) -> np.ndarray:
        """FPFH of the coarse level (radii 2 and 5 voxels), for the global step; computed on first use."""
        if self._fpfh is None:
            self._fpfh = fpfh(self.coarse, 2 * self.voxel, 5 * self.voxel)
        return self._fpfh


def as_target(reference: np.ndarray | RegistrationTarget, scale: float) -> RegistrationTarget:
    """The prepared target for ``reference`` (a prepared one is returned as is)."""
    if isinstance(reference, RegistrationTarget):
        return reference
    return RegistrationTarget(np.asarray(reference, dtype=np.float32), float(scale))


def _measure(points: np.ndarray, transform: np.ndarray, target: RegistrationTarget) -> Alignment:
    """The alignment with its fitness (both directions at 1.5 coarse voxels) and each point's distance."""
    from scipy.spatial import cKDTree

    moved = Alignment(transform, 1.0).apply(points)
    reach = 1.5 * target.voxel
    to_reference = target.tree.query(moved, k=1, distance_upper_bound=reach, workers=KNN_WORKERS)[0]
    forward = float(np.mean(to_reference <= reach))
    backward_d = cKDTree(moved).query(target.points, k=1, distance_upper_bound=reach, workers=KNN_WORKERS)[0]
    backward = float(np.mean(backward_d <= reach))
    far = ~np.isfinite(to_reference)
    if far.any():  # beyond the bound: the exact distance still matters to template_distance
        to_reference[far] = target.tree.query(moved[far], k=1, workers=KNN_WORKERS)[0]
    return Alignment(transform, min(forward, backward), to_reference.astype(np.float32))


def _close_share(alignment: Alignment, target: RegistrationTarget) -> float:
    reach = CLOSE_REACH_VOXELS * target.voxel + CLOSE_REACH_SPACINGS * target.spacing
    return float(np.mean(alignment.template_distance <= reach))


def _thinned(points: np.ndarray, count: int, seed: int) -> np.ndarray:
    """At most ``count`` of the points, drawn without replacement by ``seed`` (kept in their order)."""
    if len(points) <= count:
        return points
    return points[np.sort(np.random.default_rng(seed).choice(len(points), count, replace=False))]


def _refine(
    scan_coarse: np.ndarray, scan_fine: np.ndarray, init: np.ndarray, target: RegistrationTarget, seed: int
) -> np.ndarray:
    """Coarse-to-fine point-to-plane ICP: a wide pass (4 voxels) on a thinned coarse level, a tight one on the
    whole coarse level, and one on the fine level (thinned to FINE_ICP_POINTS) against the fine template."""
    voxel, fine_voxel = target.voxel, FINE_VOXEL_SHARE * target.scale
    coarse = (target.coarse, target.coarse_normals)
    wide = _thinned(scan_coarse, WIDE_ICP_POINTS, seed)
    transform = icp_point_to_plane(wide, *coarse, 4 * voxel, init, 30, target_tree=target.coarse_tree)
    transform = icp_point_to_plane(
        scan_coarse, *coarse, 1.5 * voxel, transform, 30, target_tree=target.coarse_tree
    )
    fine = _thinned(scan_fine, FINE_ICP_POINTS, seed)
    return icp_point_to_plane(
        fine, target.fine, target.fine_normals, 1.5 * fine_voxel, transform, 30, target_tree=target.fine_tree
    )


def align(
    points: np.ndarray, reference: np.ndarray | RegistrationTarget, scale: float, seed: int = 0
) -> Alignment:
    """Rigid alignment of ``points`` onto ``reference`` (both in the input's units; ``scale`` is the class
    scale). Pass a :class:`RegistrationTarget` to reuse what is computed from the reference across scans.

    ICP is tried first from the scan's own pose: scans of one part on one fixture differ by a few degrees,
    which ICP recovers alone. Only when that pose is doubtful (EARLY_STOP_SHARE) does ICP also start from the
    scan's centroid moved onto the reference's, and the global step run (FPFH + RANSAC on the coarse level,
    then the same ICP), in rounds of growing length that stop at the first confident pose; the best pose of
    all is kept, so a part put down in any pose is still recovered.

    Raises RegistrationError when the scan is too small or too degenerate to be registered at the class's
    voxel."""
    target = as_target(reference, scale)
    pts = np.asarray(points, dtype=np.float64)
    scan_coarse = target.level(pts, REGISTER_VOXEL_SHARE)
    if len(scan_coarse) < 3:
        raise RegistrationError(
            "cannot be registered to the class template: too few points or too little "
            f"structure at the registration voxel {target.voxel:.3g} (5% of the class scale)"
        )
    scan_fine = target.level(pts, FINE_VOXEL_SHARE)
    shift = np.eye(4)
    shift[:3, 3] = target.coarse.mean(axis=0) - scan_coarse.mean(axis=0)
    best: Alignment | None = None
    # only the scan's own pose may stop early (the fixture case); the centroid start is one more candidate
    for init, may_stop in ((np.eye(4), True), (shift, False)):
        found = _measure(pts, _refine(scan_coarse, scan_fine, init, target, seed), target)
        candidate = Alignment(found.transform, found.fitness, found.template_distance, "icp")
        if best is None or _rank(candidate, target) > _rank(best, target):
            best = candidate
        if may_stop and _confident(candidate, target):
            return candidate
    try:
        scan_fpfh = fpfh(scan_coarse, 2 * target.voxel, 5 * target.voxel)
        for round_, iterations in enumerate(GLOBAL_ROUNDS):
            coarse = register_global(
                scan_coarse,
                target.coarse,
                scan_fpfh,
                target.fpfh(),
                target.voxel,
                seed=seed + round_,
                iterations=iterations,
            )
            found = _measure(pts, _refine(scan_coarse, scan_fine, coarse, target, seed), target)
            candidate = Alignment(found.transform, found.fitness, found.template_distance, "global")
            agrees = _same_pose(candidate, best, scan_coarse, target)
            if _rank(candidate, target) >= _rank(best, target):
                best = candidate
            if agrees or _confident(best, target):  # a second, independent start found the same pose
                break
    except ValueError as exc:
        raise RegistrationError(
            "cannot be registered to the class template: too few points or too little "
            f"structure at the registration voxel {target.voxel:.3g} (5% of the class scale)"
        ) from exc
    return best


def _same_pose(a: Alignment, b: Alignment, points: np.ndarray, target: RegistrationTarget) -> bool:
    """Whether two poses put every one of ``points`` within the close reach's voxel part of each other."""
    gap = np.linalg.norm(a.apply(points) - b.apply(points), axis=1).max()
    return bool(gap <= CLOSE_REACH_VOXELS * target.voxel)


def _confident(alignment: Alignment, target: RegistrationTarget) -> bool:
    """The early stop: fitness and close share both reach EARLY_STOP_SHARE."""
    return min(alignment.fitness, _close_share(alignment, target)) >= EARLY_STOP_SHARE


def _rank(alignment: Alignment, target: RegistrationTarget) -> tuple[float, float]:
    """Which of two poses is better: the smaller of fitness and close share first, then the fitness."""
    return (min(alignment.fitness, _close_share(alignment, target)), alignment.fitness)


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
