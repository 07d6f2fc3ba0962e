"""Should a class fit register its scans? Measured on the training scans, not asked of the user.

Why: registration costs one alignment per scan and is only worth it when the scans are not already in one
pose; pre-aligned scans fitted with registration only pay for it, while scans in varying poses fitted without
it look anomalous everywhere. The fit can tell which case it is in: it aligns every training scan onto the
first and compares each one's residual (median distance of its points to the first scan's nearest point) with
and without the move. If the alignment cuts the residual clearly (below ``REGISTER_BELOW`` of the unmoved
residual), the scans were not aligned and the fit registers; if not, they were, and it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from detector.registration import COORD_VOXEL_SHARE, RegistrationTarget, align
from scans.geometry import voxel_downsample

# Register when aligning leaves at most this share of the unmoved residual: pre-aligned scans keep about all
# of it (fresh sampling noise does not align away), a pose change of a degree or more removes most of it.
REGISTER_BELOW = 0.8


@dataclass
class RegistrationChoice:
    """What the fit decided and why, with the aligned scans so they need not be aligned twice."""

    register: bool
    reason: str
    residual_unmoved: float  # median over scans 2.. of their median distance to the first scan
    residual_aligned: float  # the same after aligning them onto it
    aligned: list[np.ndarray] = field(default_factory=list)  # the scans after the move (first unchanged)
    fitness: list[float] = field(default_factory=list)  # of scans 2.. onto the first

    def to_dict(self, forced: bool = False) -> dict:
        return {
            "register": self.register,
            "decided_by": "flag" if forced else "fit",
            "reason": self.reason,
            "residual_unmoved": round(self.residual_unmoved, 6),
            "residual_aligned": round(self.residual_aligned, 6),
        }


def _residual(points: np.ndarray, tree: cKDTree) -> float:
    return float(np.median(tree.query(points, k=1, workers=1)[0]))


def choose_registration(
    scans: list[np.ndarray], names: list[str], scale: float, seed: int = 0
) -> RegistrationChoice:
    """Align scans 2.. onto the first and decide (see the module doc); fewer than two scans: no registration.

    A scan whose alignment is doubtful or fails counts against registering (the fit then keeps the input pose,
    and the reason names the scan)."""
    if len(scans) < 2:
        return RegistrationChoice(False, "one training scan: nothing to measure alignment against", 0.0, 0.0)
    first = scans[0]
    tree = cKDTree(first)
    reference = first[voxel_downsample(first, COORD_VOXEL_SHARE * scale)].astype(np.float32)
    target = RegistrationTarget(reference, scale)  # prepared once for all the scans
    unmoved, moved, aligned, fitness = [], [], [first], []
    for name, scan in zip(names[1:], scans[1:]):
        unmoved.append(_residual(scan, tree))
        try:
            alignment = align(scan, target, scale, seed=seed)
        except ValueError as exc:
            return RegistrationChoice(
                False,
                f"{name} cannot be registered onto {names[0]} ({exc}); kept the input pose",
                float(np.median(unmoved)),
                float("nan"),
            )
        if alignment.doubtful:
            return RegistrationChoice(
                False,
                f"registration of {name} onto {names[0]} is doubtful (fitness {alignment.fitness:.2f}); "
                "kept the input pose",
                float(np.median(unmoved)),
                float("nan"),
            )
        aligned.append(alignment.apply(scan))
        fitness.append(alignment.fitness)
        moved.append(_residual(aligned[-1], tree))
    before, after = float(np.median(unmoved)), float(np.median(moved))
    ratio = after / before if before > 0 else 1.0
    if ratio < REGISTER_BELOW:
        reason = (
            f"aligning the training scans onto {names[0]} cut their residual from {before:.4g} to "
            f"{after:.4g} "
            f"(x{ratio:.2f} < {REGISTER_BELOW}): they are not pre-aligned, so every scan is registered"
        )
        return RegistrationChoice(True, reason, before, after, aligned, fitness)
    reason = (
        f"aligning the training scans onto {names[0]} left their residual at x{ratio:.2f} ({before:.4g} -> "
        f"{after:.4g}, not below {REGISTER_BELOW}): they are pre-aligned, so scans keep their pose"
    )
    return RegistrationChoice(False, reason, before, after)
