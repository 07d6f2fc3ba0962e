"""A fitted class on disk: one folder (fitted.json, the bank, the backbone, the coordinate bank), written
whole.

A reader sees the old fit or the new one, never a half-written folder: the fit is written beside the target
and
renamed into place. Loading refuses another format or version, a garbled or incomplete folder, or a bank made
with
another backbone, and always names the folder and says to refit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from detector.bank import MemoryBank
from detector.config import DETECTOR_VERSION, FORMAT_NAME, META_FILE, DetectorConfig, FitError
from detector.features import FPFH_IDENTITY
from detector.manifest import ManifestError, verify_manifest, write_manifest
from detector.pointmae_runtime import OnnxBackbone, read_backbone
from detector.registration import CoordinateBank, RegistrationTarget
from detector.surface_cues import SurfaceCues
from scans import strict_json
from scans.staging import OutputError, check_replaceable, check_writable, staged_dir

FIT_KIND = "fitted class"  # the output marker's kind (scans.staging)
CUES_DIR = "cues"  # the surface cues' arrays (detector.surface_cues)
REGISTRATION_DIR = "registration"  # the template's ICP levels with normals (detector.registration)


def _is_unmarked_fit(folder: Path) -> bool:
    """A fit saved before output markers existed: its metadata file names the format."""
    return (folder / META_FILE).is_file()


def check_save_target(directory: str | os.PathLike) -> None:
    """FitError unless `FittedClass.save(directory)` can write there, as far as can be told before fitting:
    the
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


def write_fit(
    directory: str | os.PathLike,
    *,
    config: DetectorConfig,
    scale: float,
    bank: MemoryBank,
    mean_feature: np.ndarray,
    thresholds: dict[str, float],
    backbone: OnnxBackbone | None,
    info: dict,
    coord_bank: CoordinateBank | None,
    score_norms: dict[str, float],
    backbone_id: str,
    cues: SurfaceCues | None = None,
    registration: RegistrationTarget | None = None,
) -> Path:
    """Write the fit as one folder: staged beside the target, then renamed, so a reader sees the old fit or
    the new
    one. Only a fit (or an empty folder) at the same place is replaced; any other folder is refused
    (FitError),
    since it may hold the user's files."""
    target = Path(directory)
    try:
        with staged_dir(target, FIT_KIND, also_ours=_is_unmarked_fit) as tmp:
            if backbone is not None:
                backbone.save(tmp / "backbone")
            bank.save(tmp / "bank")
            np.save(tmp / "mean_feature.npy", mean_feature, allow_pickle=False)
            if coord_bank is not None:
                np.save(tmp / "coord_points.npy", coord_bank.points, allow_pickle=False)
                np.save(tmp / "coord_source.npy", coord_bank.source, allow_pickle=False)
            if cues is not None:
                (tmp / CUES_DIR).mkdir()
                cues.save(tmp / CUES_DIR)
            if registration is not None:  # so that loading skips the template's normals (a cold run's cost)
                (tmp / REGISTRATION_DIR).mkdir()
                for name, array in registration.prepared().items():
                    np.save(tmp / REGISTRATION_DIR / f"{name}.npy", array, allow_pickle=False)
            meta = {
                "format": FORMAT_NAME,
                "version": DETECTOR_VERSION,
                "config": config.to_dict(),
                "score_norms": score_norms,
                "scale": scale,
                "thresholds": thresholds,
                "backbone_id": backbone_id,
                "info": info,
            }
            (tmp / META_FILE).write_text(
                strict_json.dumps(meta, what=str(target / META_FILE), indent=2, sort_keys=True)
            )
            write_manifest(tmp)  # last: it hashes every file written above
    except OutputError as exc:
        raise FitError(str(exc)) from None
    except OSError as exc:  # e.g. the disk filled up while writing: nothing was put in place
        raise FitError(f"{target}: the fit could not be written ({exc.strerror or exc})") from None
    return target


def read_fit(directory: str | os.PathLike) -> dict[str, Any]:
    """The parts of a fit (the FittedClass constructor's arguments), checked; FitError names the folder."""
    root = Path(directory)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise FitError(
            f"{root}: not a fitted class folder (no {META_FILE}); make one with `python -m agent.fit`"
        )
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
        raise FitError(
            f"{root}: fitted with format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this build reads {FORMAT_NAME!r} version {DETECTOR_VERSION} — refit the class"
        )
    try:
        config = DetectorConfig.from_dict(meta["config"])
        scale = float(meta["scale"])
        thresholds = {str(k): float(v) for k, v in dict(meta.get("thresholds") or {}).items()}
        backbone_id = str(meta["backbone_id"])
        info = dict(meta.get("info") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FitError(
            f"{root}: {META_FILE} is incomplete or invalid ({type(exc).__name__}: {exc}); refit the class"
        ) from exc
    if not (np.isfinite(scale) and scale > 0):
        raise FitError(f"{root}: {META_FILE} has an invalid scale {scale!r}; refit the class")
    bad = [k for k, v in thresholds.items() if not np.isfinite(v)]
    if bad:
        raise FitError(f"{root / META_FILE}: threshold {bad[0]} is not a finite number; refit the class")
    backbone = _read_backbone(root, config, backbone_id)
    expect = {"feature_name": config.feature, "backbone_hash": backbone_id}
    try:
        bank = MemoryBank.load(root / "bank", expect_meta=expect)
        mean_feature = np.load(root / "mean_feature.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FitError(f"{root}: {exc}") from exc
    if not (np.issubdtype(mean_feature.dtype, np.floating) and np.isfinite(mean_feature).all()):
        raise FitError(f"{root / 'mean_feature.npy'}: holds NaN/inf or is not a float array; refit the class")
    if bank.features is None or mean_feature.shape != (bank.features.shape[1],):
        raise FitError(
            f"{root}: mean_feature.npy has shape {mean_feature.shape}, the bank's features are "
            f"{None if bank.features is None else bank.features.shape[1]} wide; refit the class"
        )
    coord_bank, norms = _read_coordinate_bank(root, meta) if config.register else (None, {})
    cues = None
    if config.surface_cues:
        try:
            cues = SurfaceCues.load(root / CUES_DIR)
            norms = {str(k): float(v) for k, v in dict(meta["score_norms"]).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FitError(f"{root / CUES_DIR}: surface cues do not load ({exc}); refit the class") from exc
        if not (norms.get("feature", 0) > 0 and np.isfinite(norms["feature"])):
            raise FitError(f"{root}: invalid score norms {norms}; refit the class")
    registration = _read_registration(root, coord_bank, scale)
    return {
        "config": config,
        "scale": scale,
        "registration": registration,
        "bank": bank,
        "mean_feature": mean_feature,
        "thresholds": thresholds,
        "backbone": backbone,
        "info": info,
        "coord_bank": coord_bank,
        "score_norms": norms,
        "cues": cues,
    }


def _read_registration(
    root: Path, coord_bank: CoordinateBank | None, scale: float
) -> RegistrationTarget | None:
    """The registration target from the levels the fit stored; None when it stored none (a fit written
    before they were: the first scan computes them)."""
    folder = root / REGISTRATION_DIR
    if coord_bank is None or not folder.is_dir():
        return None
    try:
        stored = {path.stem: np.load(path, allow_pickle=False) for path in sorted(folder.glob("*.npy"))}
        return RegistrationTarget(coord_bank.points[coord_bank.source == 0], scale, stored=stored)
    except (OSError, ValueError) as exc:
        raise FitError(f"{folder}: the registration levels do not load ({exc}); refit the class") from exc


def _read_backbone(root: Path, config: DetectorConfig, backbone_id: str) -> OnnxBackbone | None:
    """The Point-MAE backbone of a Point-MAE fit, checked against the hash the bank was built with."""
    if config.feature != "pointmae":
        if backbone_id != FPFH_IDENTITY:
            raise FitError(f"{root}: feature 'fpfh' but backbone id {backbone_id[:12]!r}; refit the class")
        return None
    try:
        return read_backbone(root / "backbone", config.backbone, backbone_id)
    except (OSError, ValueError) as exc:
        raise FitError(f"{root}: backbone does not load ({exc}); refit the class") from exc


def _read_coordinate_bank(root: Path, meta: dict) -> tuple[CoordinateBank, dict[str, float]]:
    try:
        coord_bank = CoordinateBank(
            np.load(root / "coord_points.npy", allow_pickle=False),
            np.load(root / "coord_source.npy", allow_pickle=False),
        )
        norms = {str(k): float(v) for k, v in dict(meta["score_norms"]).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FitError(
            f"{root}: registered fit without a readable coordinate bank ({exc}); refit the class"
        ) from exc
    if int((coord_bank.source == 0).sum()) < 3:
        raise FitError(
            f"{root}: the coordinate bank holds fewer than 3 points of the reference template; "
            "refit the class"
        )
    if not all(np.isfinite(v) and v > 0 for v in norms.values()) or not {"feature", "coord"} <= norms.keys():
        raise FitError(f"{root}: invalid score norms {norms}; refit the class")
    return coord_bank, norms
