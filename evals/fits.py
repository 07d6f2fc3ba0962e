"""The harness's fit cache: one fit per (class, feature) under ``<out>/fits/<class>/<feature>-<hash>/``.

The hash covers the detector config, the training files and the pretrained backbone a Point-MAE fit starts
from, so
a rerun (or another run into the same folder) never refits what it already has, and a changed config or
dataset
never silently reuses a stale fit.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

from detector.config import DetectorConfig
from detector.fitting import fit_class
from detector.pointmae import backbone_hash, load_backbone
from evals.config import HarnessError
from evals.store import FIT_META
from scans.datasets import Dataset, Sample
from scans.progress import Progress


def fit_dir(
    out: Path,
    cls: str,
    feature: str,
    config: DetectorConfig,
    train: list[Sample],
    init_hash: str | None = None,
) -> Path:
    """`<out>/fits/<class>/<feature>-<hash>`: the hash covers the config, the training files (name, size,
    mtime) and
    the pretrained backbone a Point-MAE fit starts from."""
    settings = replace(config, feature=feature).to_dict()
    if settings["register"] is False:
        del settings["register"]  # fits cached before registration existed stay valid
    payload = {
        "config": settings,
        "train": [[s.path.name, s.path.stat().st_size, int(s.path.stat().st_mtime)] for s in train],
    }
    if init_hash is not None and feature == "pointmae":
        payload["init"] = init_hash
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return Path(out) / "fits" / cls / f"{feature}-{digest}"


def ensure_fit(
    out: Path,
    dataset: Dataset,
    cls: str,
    feature: str,
    config: DetectorConfig,
    progress: Progress | None = None,
    init_backbone: Path | None = None,
) -> dict:
    """Fit a class (or reuse its cached fit); returns {"dir", "fit_s", "reused"}. ``init_backbone``: a
    pretrained
    backbone folder (``python -m tools.pointmae_train``) that Point-MAE fits start from."""
    train = list(dataset.train(cls))
    if not train:
        raise HarnessError(f"{dataset_root(dataset)}: class {cls!r} has no training scans")
    init = None
    if init_backbone is not None and feature == "pointmae":
        try:
            init = load_backbone(init_backbone, expect=config.backbone)
        except (OSError, ValueError) as exc:
            raise HarnessError(f"{init_backbone}: pretrained backbone does not load ({exc})") from exc
    directory = fit_dir(out, cls, feature, config, train, None if init is None else backbone_hash(init))
    meta_path = directory / FIT_META
    if meta_path.is_file():
        info = json.loads(meta_path.read_text()).get("info", {})
        return {"dir": str(directory), "fit_s": info.get("fit_s"), "reused": True}
    started = time.perf_counter()
    scans = [s.load().points for s in train]

    def report(stage: str, done: int, total: int, detail: str = "") -> None:
        if progress is not None:
            progress(f"fit {cls} ({feature})", done, total, stage)

    fitted = fit_class(
        scans,
        replace(config, feature=feature),
        progress=report,
        names=[str(s.path) for s in train],
        init_backbone=init,
    )
    fitted.info["fit_s"] = round(time.perf_counter() - started, 3)
    if init is not None:
        fitted.info["init_backbone"] = {"path": str(init_backbone), "hash": backbone_hash(init)}
    fitted.save(directory)
    return {"dir": str(directory), "fit_s": fitted.info["fit_s"], "reused": False}


def dataset_root(dataset: Dataset) -> str:
    return str(getattr(dataset, "root", dataset))
