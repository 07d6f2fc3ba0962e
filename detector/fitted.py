"""A fitted class: backbone + memory bank + normalisation + thresholds, saved as one folder.

This is the detector every other stage reads from. It stands on its own as an unsupervised detector (M3DM's recipe:
PatchCore on Point-MAE patch features) and, because the backbone forward pass (:meth:`FittedClass.analyse`) is
separate from the memory-bank search (:meth:`FittedClass.score`), the verifier can search the bank for only the
patches it needs: the analysis is computed once per scan and also feeds the verbalizer's statistics.

Why the bank is built from several *views* of each template: normal test scans differ from the templates by fresh
surface sampling and a small pose change; patching each template a few times with different subsamples and FPS
starts puts that sampling variance into the bank, so it is not mistaken for an anomaly.

Thresholds are calibrated on normal data only, leave-one-template-out: each template's patches are scored against
the bank rows that came from the *other* templates, which is what a normal test scan sees.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from detector.bank import MemoryBank
from detector.calibration import loo_object_scores, object_threshold
from detector.manifest import ManifestError, verify_manifest, write_manifest
from detector.pointmae import (
    PatchFeatures,
    PointMAE,
    PointMAEConfig,
    backbone_hash,
    estimate_scale,
    extract_patch_features,
    interpolate_with,
    interpolation_support,
    load_backbone,
    save_backbone,
)
from detector.registration import IDENTITY, MIN_FITNESS, Alignment, CoordinateBank, align
from scans import strict_json
from scans.staging import OutputError, check_replaceable, check_writable, staged_dir

DETECTOR_VERSION = 1
# Torch threads for the backbone's inference (bank views at fit time, analyse at test time). One thread, because
# inference is many small ops (FPS is a 512-step loop) and an OpenMP team stalls whenever another process holds a
# core: measured on the 2-core box with one other busy process, analyse of a 30k-point scan took 0.38-0.47 s on one
# thread and 0.32-2.8 s on two. Fixing the count also keeps features independent of the caller's torch setting.
INFERENCE_THREADS = 1
# Training is pinned to one thread for the same reason: with two threads a fit stalled whenever another process held a
# core (benchmarks/bench_detector.py: 88 s on one thread; 108 s to 635 s on two, depending on the machine's load).
TRAIN_THREADS = 1
FORMAT_NAME = "scanagent-fitted-class"
META_FILE = "fitted.json"
FIT_KIND = "fitted class"  # the output marker's kind (scans.staging)
FeatureKind = Literal["pointmae", "fpfh"]
ProgressFn = Callable[[str, int, int], None]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, restoring the caller's setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class FitError(ValueError):
    """A class cannot be fitted or loaded; the message names the folder or input and the problem."""


def _is_unmarked_fit(folder: Path) -> bool:
    """A fit saved before output markers existed: its metadata file names the format."""
    return (folder / META_FILE).is_file()


def check_save_target(directory: str | os.PathLike) -> None:
    """FitError unless `FittedClass.save(directory)` can write there, as far as can be told before fitting: the
    folder beside which the fit is staged can be written, and `directory` is absent, empty or a fit."""
    target = Path(directory)
    try:
        check_writable(target.parent, "folder to hold the fit")
    except OutputError as exc:
        raise FitError(f"{target}: cannot be written: {exc}") from None
    try:
        check_replaceable(target, FIT_KIND, also_ours=_is_unmarked_fit)
    except OutputError as exc:
        raise FitError(str(exc)) from None


@dataclass(frozen=True)
class DetectorConfig:
    """What a class fit does. Saved with the fit; the defaults fit one class in well under two minutes on 2 cores."""

    feature: FeatureKind = "pointmae"
    backbone: PointMAEConfig = field(default_factory=PointMAEConfig.small)
    train_steps: int = 300
    train_batch: int = 8
    bank_views: int = 4           # patchings per template put into the bank (sampling variance, see module doc)
    coreset_ratio: float = 0.25
    recon_rounds: int = 2
    seed: int = 0
    # Align every scan to the first template and add the bank of registered coordinates (tools.registration), for
    # scans that are not pre-aligned. Costs one registration per scan (a few seconds on 2 cores).
    register: bool = False

    def to_dict(self) -> dict:
        data = asdict(self)
        data["backbone"] = json.loads(self.backbone.to_json())
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
        data = dict(data)
        data.setdefault("register", False)  # fits saved before registration existed
        data["backbone"] = PointMAEConfig.from_json(data["backbone"])
        return cls(**data)


@dataclass
class ScanAnalysis:
    """Everything the backbone says about one scan, before any memory-bank search.

    Per patch: centres, member indices, features and the Point-MAE statistics; per point: the same statistics spread
    by inverse-distance 3-NN interpolation (what the verbalizer aggregates)."""

    points: np.ndarray                 # float32 (N,3), the input's order
    patches: PatchFeatures             # detector patches (G of them)
    feature_deviation: np.ndarray      # float32 (G,) distance of each patch feature to the class's mean feature
    point_stats: dict[str, np.ndarray]  # name -> float32 (N,)
    seconds: float = 0.0
    alignment: Alignment = IDENTITY    # how the points were moved onto the class's reference (register=True)
    registered: np.ndarray | None = None  # float32 (N,3) the points after that move; None without registration
    # each point's 3 nearest patch centres and their interpolation weights, found once: statistics and bank scores
    # are spread over the same support, so a point's score depends on exactly these patches
    support: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_patches(self) -> int:
        return len(self.patches.centers)

    def support_of(self, point_idx: np.ndarray, k: int = 3) -> np.ndarray:
        """(M, k) int64: each given point's k nearest detector patch centres, the support of its interpolated score."""
        return self.interpolation(k)[0][np.asarray(point_idx, dtype=np.int64)]

    def interpolation(self, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """(nearest centres (N,k), weights (N,k)) of every point; the k=3 support (the scores') is computed once."""
        if k != 3:
            return interpolation_support(self.points, self.patches.centers, k)
        if self.support is None:
            self.support = interpolation_support(self.points, self.patches.centers, k)
        return self.support

    def patches_for_points(self, point_idx: np.ndarray, k: int = 3) -> np.ndarray:
        """Detector patches whose scores decide the given points' scores: each point's k nearest patch centres (the
        interpolation's support). Scoring exactly these patches gives those points the same scores as full scoring."""
        return np.unique(self.support_of(point_idx, k).ravel())


@dataclass
class ScanScores:
    """Memory-bank scores of a scan (or of the patches a verifier asked for)."""

    patch_ids: np.ndarray       # int64 (S,) the detector patches that were searched
    # float32 (S,) each searched patch's nearest-neighbour distance in the bank; for a registered fit the unitless
    # feature/f99 + coord/c99 (FittedClass.patch_distances). The object score's PatchCore reweighting always uses
    # the feature bank's neighbours of the worst patch, scaling that patch's (combined) score.
    patch_scores: np.ndarray
    point_ids: np.ndarray       # int64 (M,) points that got a bank score
    point_scores: np.ndarray    # float32 (M,)
    object_score: float         # PatchCore-reweighted max over the searched patches
    seconds: float = 0.0


def _checked_ids(ids: np.ndarray, size: int, what: str) -> np.ndarray:
    """Sorted unique int64 ids, all in [0, size)."""
    out = np.unique(np.asarray(ids, dtype=np.int64).ravel())
    if out.size and (out[0] < 0 or out[-1] >= size):
        raise IndexError(f"{what} must lie in [0, {size}), got {out[0]}..{out[-1]}")
    return out


def _points_supported_by(analysis: ScanAnalysis, patch_ids: np.ndarray, k: int = 3) -> np.ndarray:
    """Points (sorted) among the given patches' members whose k nearest patch centres are all in ``patch_ids``."""
    if patch_ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.unique(analysis.patches.group_idx[patch_ids].ravel())
    support = analysis.support_of(candidates, k)
    inside = np.isin(support, patch_ids).all(axis=1)
    return candidates[inside]


class FittedClass:
    """A class's detector: use :func:`fit_class` to make one, :meth:`load` to read one from disk."""

    def __init__(self, config: DetectorConfig, scale: float, bank: MemoryBank, mean_feature: np.ndarray,
                 thresholds: dict[str, float], backbone: PointMAE | None, info: dict | None = None, *,
                 coord_bank: CoordinateBank | None = None, score_norms: dict[str, float] | None = None) -> None:
        self.config = config
        # register=True: the registered training points and the normal-data scales (feature, coord) that put the two
        # banks' distances in one unit before they are added
        self.coord_bank = coord_bank
        self.score_norms = dict(score_norms or {})
        if config.register and (coord_bank is None or not {"feature", "coord"} <= self.score_norms.keys()):
            raise ValueError("a registered fit needs its coordinate bank and score norms")
        # the template every scan is aligned to: the first training scan's points in the coordinate bank
        self.reference = None if coord_bank is None else coord_bank.points[coord_bank.source == 0]
        self.scale = float(scale)
        self.bank = bank
        self.mean_feature = np.asarray(mean_feature, dtype=np.float32)
        self.thresholds = dict(thresholds)
        self.backbone = backbone
        self.info = dict(info or {})

    # ------------------------------------------------------------------------------------------ analysis
    def backbone_id(self) -> str:
        """What the bank's features came from; a bank is only valid with this backbone."""
        if self.config.feature == "fpfh":
            return "fpfh-v1"
        assert self.backbone is not None
        return backbone_hash(self.backbone)

    def patch_features(self, points: np.ndarray, seed: int | None = None, *, recon: bool = True) -> PatchFeatures:
        """Detector patches of one scan with their features (Point-MAE or FPFH).

        ``recon=False`` skips Point-MAE's masked-reconstruction rounds (recon_error comes back NaN): the memory bank
        only needs features, and the rounds cost about as much as the feature pass itself."""
        seed = self.config.seed if seed is None else seed
        cfg = self.config.backbone
        if self.config.feature == "fpfh":
            from detector.btf import btf_patch_features

            centers, group_idx, feats = btf_patch_features(points, num_groups=cfg.inference_groups,
                                                           group_size=cfg.group_size, scale=self.scale, seed=seed)
            zeros = np.zeros(len(centers), dtype=np.float32)
            return PatchFeatures(centers=centers, group_idx=group_idx, features=feats, recon_error=zeros,
                                 feature_norm=np.linalg.norm(feats, axis=1).astype(np.float32))
        assert self.backbone is not None
        with torch_threads(INFERENCE_THREADS):
            return extract_patch_features(self.backbone, points, num_groups=cfg.inference_groups,
                                          group_size=cfg.group_size, seed=seed, scale=self.scale,
                                          recon_rounds=self.config.recon_rounds if recon else 0)

    def analyse(self, points: np.ndarray) -> ScanAnalysis:
        """Backbone forward pass once per scan: patch features and per-point statistics, no bank search."""
        start = time.perf_counter()
        pts = np.ascontiguousarray(points, dtype=np.float32)
        alignment, registered = IDENTITY, None
        if self.reference is not None:
            alignment = align(pts, self.reference, self.scale, seed=self.config.seed)
            registered = alignment.apply(pts)
            patches = self.patch_features(registered)
            patches.centers = alignment.undo(patches.centers)  # back to the input's frame (a rigid move: same order)
        else:
            patches = self.patch_features(pts)
        deviation = np.linalg.norm(patches.features - self.mean_feature, axis=1).astype(np.float32)
        per_patch = {"feature_norm": patches.feature_norm, "feature_deviation": deviation}
        if self.config.feature == "pointmae":
            per_patch["recon_error"] = patches.recon_error
        stacked = np.stack(list(per_patch.values()), axis=1)
        support = interpolation_support(pts, patches.centers)
        spread = interpolate_with(support, stacked)
        point_stats = {name: spread[:, i].copy() for i, name in enumerate(per_patch)}
        if alignment.template_distance is not None:  # distance to the one reference template, found while aligning
            point_stats["template_distance"] = alignment.template_distance
        return ScanAnalysis(points=pts, patches=patches, feature_deviation=deviation, point_stats=point_stats,
                            seconds=time.perf_counter() - start, alignment=alignment, registered=registered,
                            support=support)

    def patch_distances(self, analysis: ScanAnalysis, patch_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score, nearest bank row) of the given patches. With registration the score adds the coordinate bank's
        distance, each part divided by its normal-data 99th percentile (so 1 + 1 is a patch at both limits)."""
        feats = analysis.patches.features[patch_ids]
        dist, nn_idx = self.bank.score(feats)
        if self.coord_bank is not None:
            if analysis.registered is None:
                raise ValueError("this fit registers scans; analyse the scan with the same fit first")
            coord = self.coord_bank.patch_scores(analysis.registered, analysis.patches.group_idx[patch_ids])
            dist = (dist / self.score_norms["feature"] + coord / self.score_norms["coord"]).astype(np.float32)
        return dist, nn_idx

    # ------------------------------------------------------------------------------------------- scoring
    def score(self, analysis: ScanAnalysis, point_ids: np.ndarray | None = None, *,
              patch_ids: np.ndarray | None = None) -> ScanScores:
        """Bank scores for all points (the full-bank baseline), for the given points, or for the given patches.

        * ``point_ids``: the detector patches that support those points are searched (what the verifier asks).
        * ``patch_ids``: exactly those patches are searched; point scores come back for the points whose whole
          interpolation support lies among them (their scores are then final).
        * neither: every patch and every point.

        Only the chosen patches reach the bank, so the cost follows the subset, and every score returned equals the
        full scoring's value for the same patch or point exactly: the bank answers each row on its own, and a point's
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
            return ScanScores(patch_ids, np.zeros(0, np.float32), pids[:0], np.zeros(0, np.float32), 0.0,
                              time.perf_counter() - start)
        feats = analysis.patches.features[patch_ids]
        dist, nn_idx = self.patch_distances(analysis, patch_ids)
        point_scores = np.zeros(0, np.float32)
        if pids.size:
            by_patch = np.zeros(n_patches, dtype=np.float32)  # only searched patches are read: pids' support
            by_patch[patch_ids] = dist
            support_idx, weights = analysis.interpolation()
            point_scores = interpolate_with((support_idx[pids], weights[pids]), by_patch)
        obj = float(self.bank.object_score(feats, dist, nn_idx))
        return ScanScores(patch_ids=patch_ids, patch_scores=dist.astype(np.float32), point_ids=pids,
                          point_scores=point_scores.astype(np.float32), object_score=obj,
                          seconds=time.perf_counter() - start)

    def score_full(self, points: np.ndarray) -> tuple[np.ndarray, float]:
        """Convenience: (per-point scores in input order, object score) with the whole bank, the M3DM recipe."""
        analysis = self.analyse(points)
        scores = self.score(analysis)
        out = np.empty(len(points), dtype=np.float32)
        out[scores.point_ids] = scores.point_scores
        return out, scores.object_score

    # ------------------------------------------------------------------------------------------- save/load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the fit as one folder: written beside the target, then renamed, so a reader sees the old fit or the
        new one, never a half-written folder. Only a fit (or an empty folder) at the same place is replaced; any
        other folder is refused (FitError), since it may hold the user's files."""
        target = Path(directory)
        try:
            with staged_dir(target, FIT_KIND, also_ours=_is_unmarked_fit) as tmp:
                if self.backbone is not None:
                    save_backbone(self.backbone, tmp / "backbone")
                self.bank.save(tmp / "bank")
                np.save(tmp / "mean_feature.npy", self.mean_feature, allow_pickle=False)
                if self.coord_bank is not None:
                    np.save(tmp / "coord_points.npy", self.coord_bank.points, allow_pickle=False)
                    np.save(tmp / "coord_source.npy", self.coord_bank.source, allow_pickle=False)
                meta = {"format": FORMAT_NAME, "version": DETECTOR_VERSION, "config": self.config.to_dict(),
                        "score_norms": self.score_norms,
                        "scale": self.scale, "thresholds": self.thresholds, "backbone_id": self.backbone_id(),
                        "info": self.info}
                (tmp / META_FILE).write_text(strict_json.dumps(meta, what=str(target / META_FILE), indent=2,
                                                               sort_keys=True))
                write_manifest(tmp)  # last: it hashes every file written above
        except OutputError as exc:
            raise FitError(str(exc)) from None
        except OSError as exc:  # e.g. the disk filled up while writing: nothing was put in place
            raise FitError(f"{target}: the fit could not be written ({exc.strerror or exc})") from None
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FittedClass:
        """Read a fit; refuses another format/version, a garbled or incomplete folder, or a bank made with another
        backbone, always naming the folder."""
        root = Path(directory)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise FitError(f"{root}: not a fitted class folder (no {META_FILE}); make one with `python -m agent.fit`")
        try:
            verify_manifest(root, required=(META_FILE, "mean_feature.npy", "bank/bank.npy", "bank/bank.json"))
        except ManifestError as exc:
            raise FitError(str(exc)) from None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FitError(f"{root}: {META_FILE} is unreadable ({exc}); refit the class") from exc
        if not isinstance(meta, dict):
            raise FitError(f"{root}: {META_FILE} does not hold a json object; refit the class")
        if meta.get("format") != FORMAT_NAME or meta.get("version") != DETECTOR_VERSION:
            raise FitError(f"{root}: fitted with format {meta.get('format')!r} version {meta.get('version')!r}; "
                           f"this build reads {FORMAT_NAME!r} version {DETECTOR_VERSION} — refit the class")
        try:
            config = DetectorConfig.from_dict(meta["config"])
            scale = float(meta["scale"])
            thresholds = {str(k): float(v) for k, v in dict(meta.get("thresholds") or {}).items()}
            backbone_id = str(meta["backbone_id"])
            info = dict(meta.get("info") or {})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FitError(f"{root}: {META_FILE} is incomplete or invalid ({type(exc).__name__}: {exc}); "
                           "refit the class") from exc
        if not (np.isfinite(scale) and scale > 0):
            raise FitError(f"{root}: {META_FILE} has an invalid scale {scale!r}; refit the class")
        bad = [k for k, v in thresholds.items() if not np.isfinite(v)]
        if bad:
            raise FitError(f"{root / META_FILE}: threshold {bad[0]} is not a finite number; refit the class")
        backbone = None
        if config.feature == "pointmae":
            try:
                backbone = load_backbone(root / "backbone", expect=config.backbone)
            except (OSError, ValueError) as exc:
                raise FitError(f"{root}: backbone does not load ({exc})") from exc
            found = backbone_hash(backbone)
            if found != backbone_id:
                raise FitError(f"{root}: backbone hash {found[:12]} differs from the one the bank was built with "
                               f"({backbone_id[:12]}); the bank belongs to another backbone — refit the class")
        elif backbone_id != "fpfh-v1":
            raise FitError(f"{root}: feature 'fpfh' but backbone id {backbone_id[:12]!r}; refit the class")
        expect = {"feature_name": config.feature, "backbone_hash": backbone_id}
        try:
            bank = MemoryBank.load(root / "bank", expect_meta=expect)
            mean_feature = np.load(root / "mean_feature.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FitError(f"{root}: {exc}") from exc
        if not (np.issubdtype(mean_feature.dtype, np.floating) and np.isfinite(mean_feature).all()):
            raise FitError(f"{root / 'mean_feature.npy'}: holds NaN/inf or is not a float array; refit the "
                           "class")
        if bank.features is None or mean_feature.shape != (bank.features.shape[1],):
            raise FitError(f"{root}: mean_feature.npy has shape {mean_feature.shape}, the bank's features are "
                           f"{None if bank.features is None else bank.features.shape[1]} wide; refit the class")
        coord_bank, norms = None, {}
        if config.register:
            try:
                coord_bank = CoordinateBank(np.load(root / "coord_points.npy", allow_pickle=False),
                                            np.load(root / "coord_source.npy", allow_pickle=False))
                norms = {str(k): float(v) for k, v in dict(meta["score_norms"]).items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise FitError(f"{root}: registered fit without a readable coordinate bank ({exc}); "
                               "refit the class") from exc
            if int((coord_bank.source == 0).sum()) < 3:
                raise FitError(f"{root}: the coordinate bank holds fewer than 3 points of the reference template; "
                               "refit the class")
            if not all(np.isfinite(v) and v > 0 for v in norms.values()) or not {"feature", "coord"} <= norms.keys():
                raise FitError(f"{root}: invalid score norms {norms}; refit the class")
        return cls(config=config, scale=scale, bank=bank, mean_feature=mean_feature, thresholds=thresholds,
                   backbone=backbone, info=info, coord_bank=coord_bank, score_norms=norms)


# ---------------------------------------------------------------------------------------------------- fitting
def _loo_patch_scores(features: list[np.ndarray], bank: MemoryBank, bank_source: np.ndarray,
                      k: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each template's (patch distances, nearest bank rows) among the rows from other templates (normal-data
    calibration).

    Candidates come from a batched faiss search on mean-centred features; their distances are then recomputed
    exactly, because the batched (BLAS) path computes |a|^2 + |b|^2 - 2ab and loses the small distances between
    normal patches to cancellation."""
    import faiss

    rows = np.ascontiguousarray(bank.features, dtype=np.float32)
    centre = rows.mean(axis=0)
    index = faiss.IndexFlatL2(rows.shape[1])
    index.add(rows - centre)
    out = []
    for template, feats in enumerate(features):
        _, nn = index.search(np.ascontiguousarray(feats - centre, dtype=np.float32), min(k, len(rows)))
        exact = np.linalg.norm(rows[nn].astype(np.float64) - feats[:, None, :].astype(np.float64), axis=2)
        exact[bank_source[nn] == template] = np.inf  # only rows from other templates count
        best = exact.argmin(axis=1)
        # inf: every candidate came from the same template, no honest estimate
        out.append((exact[np.arange(len(feats)), best], nn[np.arange(len(feats)), best]))
    return out


def _check_train_scans(train_scans: list[np.ndarray], names: list[str], config: DetectorConfig) -> list[np.ndarray]:
    """float32 copies of the scans, or FitError naming the first one that cannot be fitted on."""
    if not train_scans:
        raise FitError("no training scans given: a class needs at least one normal scan")
    if len(names) != len(train_scans):
        raise FitError(f"{len(names)} names given for {len(train_scans)} training scans")
    # every patching must find inference_groups patches of group_size points; FPS/kNN need the points distinct
    min_points = max(config.backbone.group_size * 4, config.backbone.inference_groups)
    out = []
    for name, scan in zip(names, train_scans):
        arr = np.asarray(scan)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise FitError(f"{name}: expected an (N, 3) point array, got shape {arr.shape}")
        if len(arr) < min_points:
            raise FitError(f"{name}: has {len(arr)} points; fitting needs at least {min_points} per training scan "
                           f"(inference_groups={config.backbone.inference_groups}, "
                           f"group_size={config.backbone.group_size})")
        if not np.isfinite(arr).all():
            raise FitError(f"{name}: contains NaN or infinite coordinates (read it with tools.io.read_scan, which "
                           "drops them)")
        out.append(np.ascontiguousarray(arr, dtype=np.float32))
    return out


def fit_class(train_scans: list[np.ndarray], config: DetectorConfig = DetectorConfig(), *,
              init_backbone: PointMAE | None = None, progress: ProgressFn | None = None,
              names: list[str] | None = None) -> FittedClass:
    """Fit one class from its normal scans: Point-MAE self-supervised training (the "compression" model), bank of
    patch features with a k-center greedy coreset, and normal-data thresholds.

    ``progress(stage, done, total)`` is called after every training step (stage "train") and every bank view
    (stage "features"). ``init_backbone`` starts training from a pretrained backbone of the same config.
    Bad input raises FitError naming the scan (``names`` gives the scans' names, e.g. their files)."""
    names = list(names) if names is not None else [f"training scan {i}" for i in range(len(train_scans))]
    scans = _check_train_scans(list(train_scans), names, config)
    if config.register and len(scans) < 2:
        raise FitError("registration needs at least two training scans: the coordinate bank's scale is measured on "
                       "one template against the others")
    if config.train_steps < 0 or config.bank_views < 1 or not 0 < config.coreset_ratio <= 1:
        raise FitError(f"invalid DetectorConfig: train_steps={config.train_steps} (>= 0), bank_views="
                       f"{config.bank_views} (>= 1), coreset_ratio={config.coreset_ratio} (in (0, 1])")
    if init_backbone is not None and init_backbone.config != config.backbone:
        raise FitError("the pretrained backbone given as init has another architecture than the detector config "
                       f"({init_backbone.config} vs {config.backbone})")
    timings: dict[str, float] = {}
    scale = estimate_scale(scans)
    backbone: PointMAE | None = None
    fitness: list[float] = []
    t0 = time.perf_counter()
    if config.register:
        scans, fitness = _register_templates(scans, names, scale, config.seed)
        timings["register_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    if config.feature == "pointmae":
        from detector.pointmae_train import train_pointmae

        def report(step: int, loss: float) -> None:
            if progress is not None:
                progress("train", step + 1, config.train_steps)

        try:
            with torch_threads(TRAIN_THREADS):
                backbone = train_pointmae(scans, config.backbone, steps=config.train_steps, seed=config.seed,
                                          init=init_backbone, progress=report, batch_size=config.train_batch,
                                          scale=scale)
        except ValueError as exc:
            raise FitError(f"Point-MAE training failed: {exc}") from exc
    timings["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # features only: the probe never aligns (the scans are aligned already) nor searches a bank
    probe = FittedClass(replace(config, register=False), scale, MemoryBank(), np.zeros(1, np.float32), {}, backbone)
    bank = MemoryBank(feature_name=config.feature, backbone_hash=probe.backbone_id())
    per_template: list[np.ndarray] = []
    members: list[np.ndarray] = []   # each bank row's patch members (point indices into its template)
    total = len(scans) * config.bank_views
    for i, (name, scan) in enumerate(zip(names, scans)):
        views = []
        for v in range(config.bank_views):
            try:
                views.append(probe.patch_features(scan, seed=config.seed + 1000 * i + v, recon=False))
            except ValueError as exc:
                raise FitError(f"{name}: cannot extract patch features ({exc})") from exc
            if progress is not None:
                progress("features", i * config.bank_views + v + 1, total)
        per_template.append(np.concatenate([view.features for view in views]))
        members.append(np.concatenate([view.group_idx for view in views]))
    timings["features_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    all_feats = np.concatenate(per_template)
    source = np.concatenate([np.full(len(f), i) for i, f in enumerate(per_template)])
    kept = bank.fit(all_feats, coreset_ratio=config.coreset_ratio, seed=config.seed)
    bank_source = source[kept]
    mean_feature = all_feats.mean(axis=0).astype(np.float32)
    thresholds: dict[str, float] = {}
    coord_bank, norms = None, {}
    if config.register:
        coord_bank = CoordinateBank.from_templates(scans, scale)
    if len(scans) > 1:
        loo_pairs = _loo_patch_scores(per_template, bank, bank_source)
        loo = [dist for dist, _ in loo_pairs]
        if coord_bank is not None:
            coord_loo = coord_bank.leave_one_out_patch_scores(scans, members)
            norms = _score_norms(loo, coord_loo)
            loo = [f / norms["feature"] + c / norms["coord"] for f, c in zip(loo, coord_loo)]
        normal = np.concatenate(loo)
        normal = normal[np.isfinite(normal)]
        if normal.size:
            thresholds = {f"patch_p{q}": float(np.percentile(normal, q)) for q in (5, 50, 95, 99)}
            thresholds["patch_max"] = float(normal.max())
        thresholds |= object_threshold(loo_object_scores(bank, _split_views(per_template, loo, loo_pairs,
                                                                             config.bank_views)))
    timings["bank_s"] = time.perf_counter() - t0
    info = {"n_train": len(scans), "train_names": names, "n_train_points": [len(s) for s in scans],
            "n_train_patches": len(all_feats), "bank_size": len(kept), "scale": scale,
            **{k: round(v, 3) for k, v in timings.items()}}
    if config.register:
        info["registration_fitness"] = [round(f, 4) for f in fitness]  # of scans 2.. onto the first
        info["coord_bank_size"] = len(coord_bank) if coord_bank is not None else 0
    return FittedClass(config=config, scale=scale, bank=bank, mean_feature=mean_feature, thresholds=thresholds,
                       backbone=backbone, info=info, coord_bank=coord_bank, score_norms=norms)


def _split_views(per_template: list[np.ndarray], loo: list[np.ndarray],
                 loo_pairs: list[tuple[np.ndarray, np.ndarray]],
                 n_views: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(features, leave-one-out scores, nearest feature-bank rows) of every bank view: each template's rows are its
    views one after the other, of equal length (inference_groups patches each)."""
    views = []
    for feats, scores, (_, nn) in zip(per_template, loo, loo_pairs):
        for part in np.array_split(np.arange(len(feats)), n_views):
            views.append((feats[part], scores[part], nn[part]))
    return views


def _register_templates(scans: list[np.ndarray], names: list[str], scale: float,
                        seed: int) -> tuple[list[np.ndarray], list[float]]:
    """(the scans aligned onto the first, fitness of scans 2.. onto it). The reference is the first scan at the
    coordinate bank's voxel: the same points the bank keeps for template 0 (FittedClass.reference)."""
    from detector.registration import COORD_VOXEL_SHARE
    from scans.geometry import voxel_downsample

    first = scans[0]
    reference = first[voxel_downsample(first, COORD_VOXEL_SHARE * scale)].astype(np.float32)
    aligned, fitness = [first], []
    for name, scan in zip(names[1:], scans[1:]):
        try:
            alignment = align(scan, reference, scale, seed=seed)
        except ValueError as exc:
            raise FitError(f"{name}: {exc} (reference {names[0]})") from exc
        if alignment.doubtful:
            raise FitError(f"{name}: registration onto {names[0]} is doubtful (fitness {alignment.fitness:.2f} < "
                           f"{MIN_FITNESS}): is it the same part? Remove it or fit without --register")
        aligned.append(alignment.apply(scan))
        fitness.append(alignment.fitness)
    return aligned, fitness


def _score_norms(feature_loo: list[np.ndarray], coord_loo: list[np.ndarray]) -> dict[str, float]:
    """Normal-data 99th percentiles of both banks' patch scores: the units in which registered scores are added."""
    norms = {}
    for name, parts in (("feature", feature_loo), ("coord", coord_loo)):
        values = np.concatenate(parts)
        values = values[np.isfinite(values)]
        norms[name] = float(np.percentile(values, 99)) if values.size else 1.0
        if not norms[name] > 0:
            norms[name] = 1.0  # identical templates: any distance is unusual, keep raw units
    return norms
