"""The embedded demo behind `python -m agent.run --demo`: a procedural flange, four normal scans, one scan with a dent.

Everything is made here (no data files, no downloads) and fitted with a lighter training schedule than a real class
fit, so a fresh install shows the whole product — fit, verbalize, agent, verifier, outputs — in about a minute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from evals.defects import make_defect
from evals.parts import extent, part_mesh, sample_surface, scan_like
from tools.io import write_pcd

DEMO_PART = "flange"
DEMO_POINTS = 12000
DEMO_TRAIN_STEPS = 120


def demo_scans(seed: int = 0, points: int = DEMO_POINTS) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(four normal training scans, one test scan with a dent, its per-point ground truth)."""
    mesh = part_mesh(DEMO_PART)
    train = []
    for i in range(4):
        clean, normals = sample_surface(mesh, points, seed=seed + i)
        train.append(scan_like(clean, normals, seed=seed + 100 + i)[0].astype(np.float32))
    clean, normals = sample_surface(mesh, points, seed=seed + 50)
    dented, mask, _ = make_defect(clean, normals, "concavity", seed=seed + 7, share=0.04)
    size = extent(clean)
    test, _ = scan_like(dented, normals, seed=seed + 150, scale=size)
    return train, test.astype(np.float32), mask.astype(bool)


def prepare_demo(root: str | Path, seed: int = 0, console: Console | None = None) -> tuple[list[Path], Path]:
    """Write the demo scans under `root`, fit the class, and return ([test scan path], fitted class folder)."""
    from tools.detector import DetectorConfig, fit_class

    root = Path(root)
    train, test, mask = demo_scans(seed)
    for i, scan in enumerate(train):
        write_pcd(root / "train" / f"{DEMO_PART}_template{i}.pcd", scan)
    test_path = write_pcd(root / "test" / f"{DEMO_PART}_concavity0.pcd", test)
    np.savetxt(root / "test" / f"{DEMO_PART}_concavity0.labels.txt", mask.astype(np.uint8), fmt="%d")
    config = DetectorConfig(train_steps=DEMO_TRAIN_STEPS, bank_views=2, seed=seed)
    fitted = fit_class(train, config, names=[f"template {i}" for i in range(4)])
    if console is not None:
        info = fitted.info
        console.print(f"  fitted: {info['n_train']} scans, {info['n_train_patches']} patches, bank {info['bank_size']}, "
                      f"train {info['train_s']:.1f} s")
    bank_dir = fitted.save(root / "bank")
    return [Path(test_path)], bank_dir
