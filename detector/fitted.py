"""A fitted class: backbone + memory bank + normalisation + thresholds, saved as one folder.

This is the detector every other stage reads from. It stands on its own as an unsupervised detector (M3DM's
recipe:
PatchCore on Point-MAE patch features) and, because the backbone forward pass (:meth:`FittedClass.analyse`) is
separate from the memory-bank search (:meth:`FittedClass.score`), the verifier can search the bank for only
the
patches it needs: the analysis is computed once per scan and also feeds the verbalizer's statistics.
Fitting lives in detector.fitting, the folder format in detector.persistence.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.bank import MemoryBank
from detector.config import DetectorConfig
from detector.features import PatchFeatures, make_extractor
from detector.interpolation import interpolate_with, interpolation_support
from detector.persistence import read_fit, write_fit
from detector.pointmae_runtime import OnnxBackbone
from detector.registration import IDENTITY, Alignment, CoordinateBank, RegistrationTarget, align
from detector.surface_cues import CUE_NAMES, SurfaceCues


@dataclass
class ScanAnalysis:
    """Everything the backbone says about one scan, before any memory-bank search.

    Per patch: centres, member indices, features and the Point-MAE statistics; per point: the same statistics
    spread
    by inverse-distance 3-NN interpolation (what the verbalizer aggregates)."""

    points: np.ndarray  # float32 (N,3), the input's order
    patches: PatchFeatures  # detector patches (G of them)
    feature_deviation: np.ndarray  # float32 (G,) distance of each patch feature to the class's mean feature
    point_stats: dict[str, np.ndarray]  # name -> float32 (N,)
    seconds: float = 0.0
    alignment: Alignment = IDENTITY  # how the points were moved onto the class's reference (register=True)
    registered: np.ndarray | None = (
        None  # float32 (N,3) the points after that move; None without registration
    )
    # each point's 3 nearest patch centres and their interpolation weights, found once: statistics and bank
    # scores
    # are spread over the same support, so a point's score depends on exactly these patches
    support: tuple[np.ndarray, np.ndarray] | None = None
    # float32 (N,) per point: the summed surface cues in normal units (detector.surface_cues); None without
    cue_total: np.ndarray | None = None
    # float32 (N,) per point: +1 outside the templates' surface, -1 inside (SurfaceCues.side); None without
    # surface cues
    surface_side: np.ndarray | None = None

    @property
    def n_patches(self) -> int:
        return len(self.patches.centers)

    def support_of(self, point_idx: np.ndarray, k: int = 3) -> np.ndarray:
        """(M, k) int64: each given point's k nearest detector patch centres, the support of its interpolated
        score."""
        return self.interpolation(k)[0][np.asarray(point_idx, dtype=np.int64)]

    def interpolation(self, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """(nearest centres (N,k), weights (N,k)) of every point; the k=3 support (the scores') is computed
        once."""
        if k != 3:
            return interpolation_support(self.points, self.patches.centers, k)
        if self.support is None:
            self.support = interpolation_support(self.points, self.patches.centers, k)
        return self.support

    def patches_for_points(self, point_idx: np.ndarray, k: int = 3) -> np.ndarray:
        """Detector patches whose scores decide the given points' scores: each point's k nearest patch centres
        (the
        interpolation's support). Scoring exactly these patches gives those points the same scores as full
        scoring."""
        return np.unique(self.support_of(point_idx, k).ravel())


@dataclass
class ScanScores:
    """Memory-bank scores of a scan (or of the patches a verifier asked for)."""

    patch_ids: np.ndarray  # int64 (S,) the detector patches that were searched
    # float32 (S,) each searched patch's nearest-neighbour distance in the bank; for a registered fit the
    # unitless
    # feature/f99 + coord/c99 (FittedClass.patch_distances). The object score's PatchCore reweighting always
    # uses
    # the feature bank's neighbours of the worst patch, scaling that patch's (combined) score.
    patch_scores: np.ndarray
    point_ids: np.ndarray  # int64 (M,) points that got a bank score
    point_scores: np.ndarray  # float32 (M,)
    object_score: float  # PatchCore-reweighted max over the searched patches
    seconds: float = 0.0


def _checked_ids(ids: np.ndarray, size: int, what: str) -> np.ndarray:
    """Sorted unique int64 ids, all in [0, size)."""
    out = np.unique(np.asarray(ids, dtype=np.int64).ravel())
    if out.size and (out[0] < 0 or out[-1] >= size):
        raise IndexError(f"{what} must lie in [0, {size}), got {out[0]}..{out[-1]}")
    return out


def _points_supported_by(analysis: ScanAnalysis, patch_ids: np.ndarray, k: int = 3) -> np.ndarray:
    """Points (sorted) among the given patches' members whose k nearest patch centres are all in
    ``patch_ids``."""
    if patch_ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.unique(analysis.patches.group_idx[patch_ids].ravel())
    support = analysis.support_of(candidates, k)
    inside = np.isin(support, patch_ids).all(axis=1)
    return candidates[inside]


class FittedClass:
    """A class's detector: use :func:`fit_class` to make one, :meth:`load` to read one from disk."""

    def __init__(
        self,
        config: DetectorConfig,
        scale: float,
        bank: MemoryBank,
        mean_feature: np.ndarray,
        thresholds: dict[str, float],
        backbone: OnnxBackbone | None,
        info: dict | None = None,
        *,
        coord_bank: CoordinateBank | None = None,
        score_norms: dict[str, float] | None = None,
        cues: SurfaceCues | None = None,
        registration: RegistrationTarget | None = None,
    ) -> None:
        self.config = config
        # per-point surface evidence fused with the bank's score (config.surface_cues), in the same unit: the
        # bank's parts are divided by their normal-data norms, so "feature" must be among them
        self.cues = cues
        if config.surface_cues and (cues is None or "feature" not in (score_norms or {})):
            raise ValueError("a fit with surface cues needs its cues and the feature bank's score norm")
        # register=True: the registered training points and the normal-data scales (feature, coord) that put
        # the two
        # banks' distances in one unit before they are added
        self.coord_bank = coord_bank
        self.score_norms = dict(score_norms or {})
        if config.register and (coord_bank is None or not {"feature", "coord"} <= self.score_norms.keys()):
            raise ValueError("a registered fit needs its coordinate bank and score norms")
        # the template every scan is aligned to: the first training scan's points in the coordinate bank
        self.reference = None if coord_bank is None else coord_bank.points[coord_bank.source == 0]
        # what align needs of the reference: as the fitted folder stored it, else made on the first scan
        self._registration: RegistrationTarget | None = registration if self.reference is not None else None
        self.scale = float(scale)
        self.bank = bank
        self.mean_feature = np.asarray(mean_feature, dtype=np.float32)
        self.thresholds = dict(thresholds)
        self.backbone = backbone
        self.info = dict(info or {})
        cfg = config.backbone
        self.extractor = make_extractor(
            config.feature,
            backbone,
            num_groups=cfg.inference_groups,
            group_size=cfg.group_size,
            scale=self.scale,
            recon_rounds=config.recon_rounds,
        )

    # ------------------------------------------------------------------------------------------ analysis
    def backbone_id(self) -> str:
        """What the bank's features came from; a bank is only valid with this backbone."""
        return self.extractor.identity()

    def patch_features(
        self, points: np.ndarray, seed: int | None = None, *, recon: bool = True
    ) -> PatchFeatures:
        """Detector patches of one scan with their features (see detector.features)."""
        return self.extractor.patch_features(
            points, seed=self.config.seed if seed is None else seed, recon=recon
        )

    def registration_target(self) -> RegistrationTarget:
        """The reference prepared for registration (KD-tree, ICP levels with normals, FPFH on demand), built
        on the first scan and reused for every later one."""
        if self.reference is None:
            raise ValueError("this fit does not register scans")
        if self._registration is None:
            self._registration = RegistrationTarget(self.reference, self.scale)
        return self._registration

    def analyse(self, points: np.ndarray) -> ScanAnalysis:
        """Backbone forward pass once per scan: patch features and per-point statistics, no bank search."""
        start = time.perf_counter()
        pts = np.ascontiguousarray(points, dtype=np.float32)
        alignment, registered = IDENTITY, None
        if self.reference is not None:
            alignment = align(pts, self.registration_target(), self.scale, seed=self.config.seed)
            registered = alignment.apply(pts)
            patches = self.patch_features(registered)
            patches.centers = alignment.undo(
                patches.centers
            )  # back to the input's frame (a rigid move: same order)
        else:
            patches = self.patch_features(pts)
        deviation = np.linalg.norm(patches.features - self.mean_feature, axis=1).astype(np.float32)
        per_patch = {"feature_norm": patches.feature_norm, "feature_deviation": deviation}
        if self.extractor.has_recon:
            per_patch["recon_error"] = patches.recon_error
        stacked = np.stack(list(per_patch.values()), axis=1)
        support = interpolation_support(pts, patches.centers)
        spread = interpolate_with(support, stacked)
        point_stats = {name: spread[:, i].copy() for i, name in enumerate(per_patch)}
        if (
            alignment.template_distance is not None
        ):  # distance to the one reference template, found while aligning
            point_stats["template_distance"] = alignment.template_distance
        cue_total = side = None
        if self.cues is not None:  # in the templates' frame: registered, or the input pose (pre-aligned)
            framed = pts if registered is None else registered
            cues = self.cues.per_point(framed)
            point_stats |= cues
            cue_total = sum(cues[name] for name in CUE_NAMES).astype(np.float32)
            side = self.cues.side(framed)
        return ScanAnalysis(
            points=pts,
            patches=patches,
            feature_deviation=deviation,
            point_stats=point_stats,
            seconds=time.perf_counter() - start,
            alignment=alignment,
            registered=registered,
            support=support,
            cue_total=cue_total,
            surface_side=side,
        )

    def patch_distances(self, analysis: ScanAnalysis, patch_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score, nearest bank row) of the given patches. With registration the score adds the coordinate
        bank's
        distance, each part divided by its normal-data 99th percentile (so 1 + 1 is a patch at both
        limits)."""
        feats = analysis.patches.features[patch_ids]
        dist, nn_idx = self.bank.score(feats)
        if self.cues is not None and self.coord_bank is None:
            dist = (dist / self.score_norms["feature"]).astype(np.float32)
        if self.coord_bank is not None:
            if analysis.registered is None:
                raise ValueError("this fit registers scans; analyse the scan with the same fit first")
            coord = self.coord_bank.patch_scores(analysis.registered, analysis.patches.group_idx[patch_ids])
            dist = (dist / self.score_norms["feature"] + coord / self.score_norms["coord"]).astype(np.float32)
        return dist, nn_idx

    # ------------------------------------------------------------------------------------------- scoring
    def score(
        self,
        analysis: ScanAnalysis,
        point_ids: np.ndarray | None = None,
        *,
        patch_ids: np.ndarray | None = None,
    ) -> ScanScores:
        """Bank scores for all points (the full-bank baseline), for the given points, or for the given
        patches.

        * ``point_ids``: the detector patches that support those points are searched (what the verifier asks).
        * ``patch_ids``: exactly those patches are searched; point scores come back for the points whose whole
          interpolation support lies among them (their scores are then final).
        * neither: every patch and every point.

        Only the chosen patches reach the bank, so the cost follows the subset, and every score returned
        equals the
        full scoring's value for the same patch or point exactly: the bank answers each row on its own, and a
        point's
        score depends only on its supporting patches."""
        start = time.perf_counter()
        n_points, n_patches = len(analysis.points), analysis.n_patches
        if point_ids is not None and patch_ids is not None:
            raise ValueError("score: give point_ids or patch_ids, not both")
        if patch_ids is not None:
            patch_ids = _checked_ids(patch_ids, n_patches, "patch ids")
            pids = _points_supported_by(analysis, patch_ids)
        elif point_ids is None:
            pids = np.arange(n_points, dtype=np.int64)
            patch_ids = np.arange(n_patches, dtype=np.int64)
        else:
            pids = _checked_ids(point_ids, n_points, "point ids")
            patch_ids = analysis.patches_for_points(pids)
        if patch_ids.size == 0:
            return ScanScores(
                patch_ids,
                np.zeros(0, np.float32),
                pids[:0],
                np.zeros(0, np.float32),
                0.0,
                time.perf_counter() - start,
            )
        feats = analysis.patches.features[patch_ids]
        dist, nn_idx = self.patch_distances(analysis, patch_ids)
        point_scores = np.zeros(0, np.float32)
        if pids.size:
            by_patch = np.zeros(n_patches, dtype=np.float32)  # only searched patches are read: pids' support
            by_patch[patch_ids] = dist
            support_idx, weights = analysis.interpolation()
            point_scores = interpolate_with((support_idx[pids], weights[pids]), by_patch)
        obj = float(self.bank.object_score(feats, dist, nn_idx))
        if analysis.cue_total is not None and pids.size:
            # the cues are per point and computed in analyse, so a subset's fused score equals the full one's
            point_scores = point_scores + analysis.cue_total[pids]
            obj = max(obj, float(point_scores.max()))
        return ScanScores(
            patch_ids=patch_ids,
            patch_scores=dist.astype(np.float32),
            point_ids=pids,
            point_scores=point_scores.astype(np.float32),
            object_score=obj,
            seconds=time.perf_counter() - start,
        )

    def score_full(self, points: np.ndarray) -> tuple[np.ndarray, float]:
        """Convenience: (per-point scores in input order, object score) with the whole bank, the M3DM
        recipe."""
        analysis = self.analyse(points)
        scores = self.score(analysis)
        out = np.empty(len(points), dtype=np.float32)
        out[scores.point_ids] = scores.point_scores
        return out, scores.object_score

    # ------------------------------------------------------------------------------------------- save/load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the fit as one folder, atomically (detector.persistence)."""
        return write_fit(
            directory,
            config=self.config,
            scale=self.scale,
            bank=self.bank,
            mean_feature=self.mean_feature,
            thresholds=self.thresholds,
            backbone=self.backbone,
            info=self.info,
            coord_bank=self.coord_bank,
            score_norms=self.score_norms,
            backbone_id=self.backbone_id(),
            cues=self.cues,
            registration=None if self.reference is None else self.registration_target(),
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FittedClass:
        """Read a fit; FitError names the folder and the problem (detector.persistence)."""
        return cls(**read_fit(directory))
