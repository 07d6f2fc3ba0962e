"""The verifier: rescore only the agent's suspect regions with the memory bank.

Why this exists: the bank search is the trustworthy part of the detector and the agent only says *where* to
spend it.
The verifier takes the suspect regions (verbalizer patches), adds a margin of neighbouring points, searches
the bank
for exactly the detector patches that support those points (:meth:`tools.detector.FittedClass.score`, the same
code
path as ``--verify all``, so a verified point's score equals its full-bank score) and leaves every other point
with a
low prior score below the class's normal range.

The prior keeps the order the backbone's own statistics suggest among unverified points (so a missed defect is
not tied
with the whole surface), but it never rises above ``floor``: the 5th percentile of normal patch distances
measured
leave-one-template-out at fit time, i.e. below almost every verified normal point. The order is that of the
point-wise
cue: every learned statistic as a robust z-score over the scan's points, cut at 0, summed -- the learned part
of the
evidence the verbalizer's `cue` column combines per patch (which adds geometric outliers at a lower weight).
One
statistic alone (say the distance to the class template) misses the defects that only another one sees; on the
registered dev benchmark ordering by the sum instead of by the template distance alone lifted the policy's
P-AUROC
from 96.6% to 98.9% of the full bank's, at the same 13% verified.

Without a fitted bank, a labelled zero-shot mode compares each suspect patch's FPFH features with those of the
scan's
own far-away patches (a defect is unlike the rest of its own part).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from detector.calibration import OBJECT_THRESHOLD
from detector.fitted import FittedClass, ScanAnalysis
from scans.patches import Patches
from scans.stats import robust_z, z_floor

CONFIRM_QUANTILE = "patch_p99"


@dataclass
class RegionVerdict:
    """One suspect region after verification."""

    patch_ids: list[int]
    reason: str
    confidence: float
    point_count: int
    verdict: str  # "confirmed" | "rejected" | "skipped" (verification budget spent)
    # a region too large for the budget left is verified on its leading patches only (the agent lists the
    # likeliest first): these; None when it was verified whole (or skipped)
    partial_patch_ids: list[int] | None = None
    max_distance: float | None = None
    mean_distance: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Verification:
    """Per-point scores (input order), object score and region verdicts of one scan."""

    point_scores: np.ndarray  # float32 (N,)
    object_score: float
    verified: np.ndarray  # bool (N,) points that got a bank score
    regions: list[RegionVerdict] = field(default_factory=list)
    mode: str = "bank"  # "bank" | "zero-shot"
    patches_searched: int = 0
    patches_total: int = 0
    object_threshold: float | None = (
        None  # the class's calibrated object threshold; None: no verdict possible
    )

    @property
    def verified_fraction(self) -> float:
        return float(self.verified.mean()) if self.verified.size else 0.0


def _with_margin(points: np.ndarray, region_points: np.ndarray, margin: float) -> np.ndarray:
    """Indices of the region's points plus every point within `margin` of one of them."""
    if region_points.size == 0 or margin <= 0:
        return region_points
    tree = cKDTree(points[region_points])
    dist, _ = tree.query(points, k=1, distance_upper_bound=margin)
    return np.union1d(region_points, np.flatnonzero(np.isfinite(dist)))


def point_cue(point_stats: dict[str, np.ndarray]) -> np.ndarray:
    """Per point: the sum over learned statistics of max(0, robust z-score over this scan's points)."""
    if not point_stats:
        raise ValueError("point_cue needs at least one per-point statistic")
    cue = np.zeros(len(next(iter(point_stats.values()))), dtype=np.float64)
    for name, values in point_stats.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != cue.shape or not np.isfinite(values).all():
            raise ValueError(f"statistic {name!r} must be {cue.size} finite values, one per point")
        cue += np.maximum(
            robust_z(values, z_floor(name, values)), 0.0
        )  # the verbalizer's z-scores, per point
    return cue


def prior_scores(analysis: ScanAnalysis | None, n_points: int, floor: float) -> np.ndarray:
    """Low scores for unverified points: rank of the point-wise cue, squeezed into [0, floor)."""
    if analysis is None or not analysis.point_stats:
        return np.zeros(n_points, dtype=np.float32)
    cue = point_cue(analysis.point_stats)
    ranks = np.argsort(np.argsort(cue, kind="stable"), kind="stable").astype(np.float64)
    return (floor * 0.999 * ranks / max(n_points - 1, 1)).astype(np.float32)


def prior_baseline(fitted: FittedClass, analysis: ScanAnalysis) -> np.ndarray:
    """Every point's score before any verification: what the verifier gives the points it does not score."""
    return prior_scores(analysis, len(analysis.points), prior_floor(fitted))


def prior_floor(fitted: FittedClass) -> float:
    """The ceiling of the prior: the class's 5th-percentile normal patch distance (leave-one-template-out)."""
    return float(fitted.thresholds.get("patch_p5", 0.0)) or 1e-6


def _region_fields(region: dict, own: np.ndarray) -> dict:
    """The agent's description of a region, as every verdict carries it."""
    return {
        "patch_ids": [int(p) for p in region["patch_ids"]],
        "reason": str(region.get("reason", "")),
        "confidence": float(region.get("confidence", 0.0)),
        "point_count": int(own.size),
    }


def _budgeted_regions(
    regions: list[dict],
    patches: Patches,
    points: np.ndarray,
    max_points: int,
    margin: float,
    already: np.ndarray | None = None,
) -> tuple[list[tuple[dict, np.ndarray, np.ndarray | None]], np.ndarray]:
    """Regions in confidence order with their points (+margin) while the point budget lasts; None = skipped.
    Points `already` scored (the agent's bank look-ups) count towards the budget. A region too large for what
    is left is verified on as many of its leading patches as fit (the region's dict then carries them as
    "partial_patch_ids"): skipping it whole left a six-patch region naming a defect unverified, and its scan
    scored as normal."""
    order = sorted(range(len(regions)), key=lambda i: (-float(regions[i].get("confidence", 0.0)), i))
    chosen = np.zeros(len(points), dtype=bool) if already is None else already.copy()
    planned: list[tuple[dict, np.ndarray, np.ndarray | None]] = []

    def fits(candidate: np.ndarray) -> bool:
        return int(chosen.sum() + (~chosen[candidate]).sum()) <= max_points

    for i in order:
        region = regions[i]
        ids = list(region["patch_ids"])
        own = patches.points_of(ids)
        grown = _with_margin(points, own, margin)
        if not fits(grown):
            grown = own  # try without margin before cutting the region
        leading = len(ids)
        while leading > 1 and not fits(grown):
            leading -= 1
            grown = patches.points_of(ids[:leading])
        if not fits(grown):
            planned.append((region, own, None))
            continue
        if leading < len(ids):
            region = {**region, "partial_patch_ids": [int(p) for p in ids[:leading]]}
        chosen[grown] = True
        planned.append((region, own, grown))
    return planned, chosen


def _verdicts(
    planned: list[tuple[dict, np.ndarray, np.ndarray | None]], scores: np.ndarray, threshold: float | None
) -> list[RegionVerdict]:
    """Per region: skipped when the budget left it out, else confirmed when its top score passes
    `threshold`."""
    verdicts = []
    for region, own, grown in planned:
        base = _region_fields(region, own)
        if grown is None or own.size == 0:
            verdicts.append(RegionVerdict(**base, verdict="skipped"))
            continue
        region_scores = scores[own]
        top = float(region_scores.max())
        confirmed = threshold is not None and top > threshold
        verdicts.append(
            RegionVerdict(
                **base,
                verdict="confirmed" if confirmed else "rejected",
                partial_patch_ids=region.get("partial_patch_ids"),
                max_distance=top,
                mean_distance=float(region_scores.mean()),
                threshold=None if threshold is None else float(threshold),
            )
        )
    return verdicts


def verify(
    fitted: FittedClass,
    analysis: ScanAnalysis,
    patches: Patches,
    regions: list[dict],
    *,
    max_fraction: float = 0.2,
    margin: float = 0.0,
    already_scored: np.ndarray | None = None,
    verify_all: bool = False,
) -> Verification:
    """Bank scores for the suspect regions only (or for every point with ``verify_all``), prior elsewhere."""
    points = analysis.points
    n = len(points)
    floor = prior_floor(fitted)
    threshold = fitted.thresholds.get(CONFIRM_QUANTILE)
    scores = prior_scores(analysis, n, floor)
    planned, chosen = _budgeted_regions(
        regions, patches, points, int(max_fraction * n) if not verify_all else n, margin, already_scored
    )
    if verify_all:
        chosen[:] = True
    result = fitted.score(analysis, None if verify_all else np.flatnonzero(chosen))
    scores[result.point_ids] = result.point_scores
    verified = np.zeros(n, dtype=bool)
    verified[result.point_ids] = True
    object_score = result.object_score if result.point_ids.size else float(scores.max(initial=0.0))
    verdicts = _verdicts(planned, scores, threshold)
    return Verification(
        point_scores=scores,
        object_score=float(object_score),
        verified=verified,
        regions=verdicts,
        mode="bank",
        patches_searched=int(result.patch_ids.size),
        patches_total=analysis.n_patches,
        object_threshold=fitted.thresholds.get(OBJECT_THRESHOLD),
    )


def verify_zero_shot(
    points: np.ndarray,
    patches: Patches,
    regions: list[dict],
    *,
    max_fraction: float = 0.2,
    far_share: float = 0.25,
    seed: int = 0,
) -> Verification:
    """No fitted class: a suspect patch's FPFH signature against those of the scan's own far-away patches.

    Scores are distances in FPFH space to the nearest far patch (far = beyond ``far_share`` of the
    bounding-box
    diagonal); unsuspected points get 0. Labelled ``zero-shot`` in every report because it has no notion of
    the
    class's normal variation."""
    from scans.geometry import fpfh

    n = len(points)
    diag = float(np.linalg.norm(points.max(axis=0) - points.min(axis=0)))
    features = fpfh(points, radius_normal=0.02 * diag, radius_feature=0.05 * diag)
    pid = patches.patch_of_point
    sums = np.zeros((patches.n_patches, features.shape[1]))
    np.add.at(sums, pid, features)
    patch_feat = sums / np.maximum(patches.counts, 1)[:, None]
    planned, chosen = _budgeted_regions(regions, patches, points, int(max_fraction * n), 0.0)
    scores = np.zeros(n, dtype=np.float32)
    all_dist = np.zeros(patches.n_patches)
    for p in np.unique(pid[chosen]):
        far = np.linalg.norm(patches.centers - patches.centers[p], axis=1) > far_share * diag
        if not far.any():
            continue
        all_dist[p] = float(np.min(np.linalg.norm(patch_feat[far] - patch_feat[p], axis=1)))
        members = np.flatnonzero(pid == p)
        scores[members[chosen[members]]] = all_dist[p]
    baseline = float(np.median(all_dist[all_dist > 0])) if (all_dist > 0).any() else 0.0
    verdicts = _verdicts(planned, scores, 1.5 * baseline)
    return Verification(
        point_scores=scores,
        object_score=float(scores.max(initial=0.0)),
        verified=chosen,
        regions=verdicts,
        mode="zero-shot",
        patches_searched=len(np.unique(pid[chosen])),
        patches_total=patches.n_patches,
    )
