"""Fitting a class from its normal scans: Point-MAE training, a bank of patch features, normal-data
thresholds.

Why the bank is built from several *views* of each template: normal test scans differ from the templates by
fresh
surface sampling and a small pose change; patching each template a few times with different subsamples and FPS
starts puts that sampling variance into the bank, so it is not mistaken for an anomaly.

Thresholds are calibrated on normal data only, leave-one-template-out: each template's patches are scored
against
the bank rows that came from the *other* templates, which is what a normal test scan sees.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from detector.bank import MemoryBank
from detector.calibration import object_threshold
from detector.config import TRAIN_THREADS, DetectorConfig, FitError
from detector.features import make_extractor
from detector.fitted import FittedClass
from detector.grouping import estimate_scale
from detector.normal_scores import TemplateViews, feature_scores, fused_patch_scores, view_object_scores
from detector.pointmae_runtime import OnnxBackbone, onnx_backbone
from detector.registration import (
    COORD_VOXEL_SHARE,
    MIN_FITNESS,
    CoordinateBank,
    RegistrationTarget,
    align,
)
from detector.registration_choice import choose_registration
from detector.surface_cues import SurfaceCues
from scans.geometry import voxel_downsample
from scans.progress import Progress

if TYPE_CHECKING:  # torch is imported only when a fit trains Point-MAE
    from detector.pointmae import PointMAE


def _check_train_scans(
    train_scans: list[np.ndarray], names: list[str], config: DetectorConfig
) -> list[np.ndarray]:
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
            raise FitError(
                f"{name}: has {len(arr)} points; fitting needs at least {min_points} per training scan "
                f"(inference_groups={config.backbone.inference_groups}, "
                f"group_size={config.backbone.group_size})"
            )
        if not np.isfinite(arr).all():
            raise FitError(
                f"{name}: contains NaN or infinite coordinates (read it with scans.io.read_scan, which "
                "drops them)"
            )
        out.append(np.ascontiguousarray(arr, dtype=np.float32))
    return out


def fit_class(
    train_scans: list[np.ndarray],
    config: DetectorConfig = DetectorConfig(),
    *,
    init_backbone: PointMAE | OnnxBackbone | None = None,
    progress: Progress | None = None,
    names: list[str] | None = None,
) -> FittedClass:
    """Fit one class from its normal scans: Point-MAE self-supervised training (the "compression" model), bank
    of
    patch features with a k-center greedy coreset, and normal-data thresholds.

    ``progress(stage, done, total)`` is called after every training step (stage "train") and every bank view
    (stage "features"). ``init_backbone`` starts training from a pretrained backbone of the same config.
    Bad input raises FitError naming the scan (``names`` gives the scans' names, e.g. their files)."""
    names = list(names) if names is not None else [f"training scan {i}" for i in range(len(train_scans))]
    scans = _check_train_scans(list(train_scans), names, config)
    if config.surface_cues and len(scans) < 2:
        config = replace(config, surface_cues=False)  # the cues calibrate templates on each other
    if config.register and len(scans) < 2:
        raise FitError(
            "registration needs at least two training scans: the coordinate bank's scale is measured on "
            "one template against the others"
        )
    if config.train_steps < 0 or config.bank_views < 1 or not 0 < config.coreset_ratio <= 1:
        raise FitError(
            f"invalid DetectorConfig: train_steps={config.train_steps} (>= 0), bank_views="
            f"{config.bank_views} (>= 1), coreset_ratio={config.coreset_ratio} (in (0, 1])"
        )
    if init_backbone is not None and init_backbone.config != config.backbone:
        raise FitError(
            "the pretrained backbone given as init has another architecture than the detector config "
            f"({init_backbone.config} vs {config.backbone})"
        )
    timings: dict[str, float] = {}
    scale = estimate_scale(scans)
    backbone: OnnxBackbone | None = None
    fitness: list[float] = []
    t0 = time.perf_counter()
    decision: dict = {"register": bool(config.register), "decided_by": "flag"}
    if config.register is None:
        choice = choose_registration(scans, names, scale, config.seed)
        config = replace(config, register=choice.register)
        decision = choice.to_dict()
        if choice.register:
            scans, fitness = choice.aligned, choice.fitness
    elif config.register:
        scans, fitness = _register_templates(scans, names, scale, config.seed)
    if decision["decided_by"] == "fit" or config.register:
        timings["register_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if config.feature == "pointmae":
        # torch only when fitting Point-MAE: train, then export the pass inference runs (pointmae_graph)
        from detector.pointmae import torch_threads
        from detector.pointmae_train import train_pointmae

        def report(step: int, loss: float) -> None:
            if progress is not None:
                progress("train", step + 1, config.train_steps)

        init_model = init_backbone.torch_model() if isinstance(init_backbone, OnnxBackbone) else init_backbone
        try:
            with torch_threads(TRAIN_THREADS):
                model = train_pointmae(
                    scans,
                    config.backbone,
                    steps=config.train_steps,
                    seed=config.seed,
                    init=init_model,
                    progress=report,
                    batch_size=config.train_batch,
                    scale=scale,
                )
        except ValueError as exc:
            raise FitError(f"Point-MAE training failed: {exc}") from exc
        timings["train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        backbone = onnx_backbone(model)
        timings["export_s"] = time.perf_counter() - t0
    else:
        timings["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # features only: the scans are aligned already and no bank is searched
    probe = make_extractor(
        config.feature,
        backbone,
        num_groups=config.backbone.inference_groups,
        group_size=config.backbone.group_size,
        scale=scale,
        recon_rounds=config.recon_rounds,
    )
    bank = MemoryBank(feature_name=config.feature, backbone_hash=probe.identity())
    per_template: list[np.ndarray] = []
    members: list[np.ndarray] = []  # each bank row's patch members (point indices into its template)
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
    coord_bank = CoordinateBank.from_templates(scans, scale) if config.register else None
    norms: dict[str, float] = {}
    cues: SurfaceCues | None = None
    if len(scans) > 1:
        thresholds, norms, cues = _calibrate(
            TemplateViews(per_template, members, scans, config.bank_views), bank, bank_source, coord_bank,
            config.surface_cues,
        )
    timings["bank_s"] = time.perf_counter() - t0
    info = {
        "n_train": len(scans),
        "train_names": names,
        "n_train_points": [len(s) for s in scans],
        "n_train_patches": len(all_feats),
        "bank_size": len(kept),
        "scale": scale,
        **{k: round(v, 3) for k, v in timings.items()},
    }
    info["registration_decision"] = decision
    if config.register:
        info["registration_fitness"] = [round(f, 4) for f in fitness]  # of scans 2.. onto the first
        info["coord_bank_size"] = len(coord_bank) if coord_bank is not None else 0
    return FittedClass(
        config=config,
        scale=scale,
        bank=bank,
        mean_feature=mean_feature,
        thresholds=thresholds,
        backbone=backbone,
        info=info,
        coord_bank=coord_bank,
        score_norms=norms,
        cues=cues,
    )


def _calibrate(
    views: TemplateViews,
    bank: MemoryBank,
    bank_source: np.ndarray,
    coord_bank: CoordinateBank | None,
    with_cues: bool,
) -> tuple[dict[str, float], dict[str, float], SurfaceCues | None]:
    """(thresholds, score norms, surface cues) from the templates alone, each scored leave-one-template-out
    (detector.normal_scores); the object threshold is corrected by the leave-two-out lean (calibration)."""
    n = len(views.features)
    loo = [feature_scores(views.features, bank, bank_source, frozenset({t}), t)[0] for t in range(n)]
    norms: dict[str, float] = {}
    if coord_bank is not None or with_cues:
        coord_loo = None
        if coord_bank is not None:
            coord_loo = coord_bank.leave_one_out_patch_scores(views.points, views.members)
        norms = _score_norms(loo, coord_loo)
    cues = SurfaceCues.fit(views.points)[0] if with_cues else None
    parts = dict(norms=norms, coord_bank=coord_bank, cues=cues)
    fused = []
    for t in range(n):
        # a patch's typical fused point score: its bank score plus its points' mean cue
        scores, cue_mean, _ = fused_patch_scores(views, loo[t], t, frozenset({t}), **parts)
        fused.append(scores + cue_mean)
    normal = np.concatenate(fused)
    normal = normal[np.isfinite(normal)]
    thresholds: dict[str, float] = {}
    if normal.size:
        thresholds = {f"patch_p{q}": float(np.percentile(normal, q)) for q in (5, 50, 95, 99)}
        thresholds["patch_max"] = float(normal.max())
    one_out = view_object_scores(views, bank, bank_source, 1, **parts)
    two_out = view_object_scores(views, bank, bank_source, 2, **parts) if n > 2 else None
    thresholds |= object_threshold(one_out, two_out)
    return thresholds, norms, cues


def _register_templates(
    scans: list[np.ndarray], names: list[str], scale: float, seed: int
) -> tuple[list[np.ndarray], list[float]]:
    """(the scans aligned onto the first, fitness of scans 2.. onto it). The reference is the first scan at
    the
    coordinate bank's voxel: the same points the bank keeps for template 0 (FittedClass.reference)."""
    first = scans[0]
    reference = first[voxel_downsample(first, COORD_VOXEL_SHARE * scale)].astype(np.float32)
    aligned, fitness = [first], []
    try:
        target = RegistrationTarget(reference, scale)  # prepared once for all the templates
    except ValueError as exc:
        raise FitError(f"{names[0]}: {exc}") from exc
    for name, scan in zip(names[1:], scans[1:]):
        try:
            alignment = align(scan, target, scale, seed=seed)
        except ValueError as exc:
            raise FitError(f"{name}: {exc} (reference {names[0]})") from exc
        if alignment.doubtful:
            raise FitError(
                f"{name}: registration onto {names[0]} is doubtful (fitness {alignment.fitness:.2f} < "
                f"{MIN_FITNESS}): is it the same part? Remove it or fit without --register"
            )
        aligned.append(alignment.apply(scan))
        fitness.append(alignment.fitness)
    return aligned, fitness


def _score_norms(feature_loo: list[np.ndarray], coord_loo: list[np.ndarray] | None) -> dict[str, float]:
    """Normal-data 99th percentiles of both banks' patch scores: the units in which registered scores are
    added."""
    norms = {}
    for name, parts in (("feature", feature_loo), ("coord", coord_loo)):
        if parts is None:
            continue
        values = np.concatenate(parts)
        values = values[np.isfinite(values)]
        norms[name] = float(np.percentile(values, 99)) if values.size else 1.0
        if not norms[name] > 0:
            norms[name] = 1.0  # identical templates: any distance is unusual, keep raw units
    return norms
