"""The embedded demo behind `python -m agent.run --demo`: a procedural pipe elbow, four normal scans, one with
a dent.

Everything is made here (no data files, no downloads), so a fresh install shows the whole product — fit,
verbalize,
agent, verifier, outputs — offline within the demo's time budget (README, docs/design.md).

Why these choices (the measurements are in docs/design.md):
- The part is the pipe elbow: a smooth tube whose only sharp features are its two rims, so a dent is a local
change
  of curvature the verbalizer's statistics can point at. On the flange, edges and bores outrank a smooth dent.
- The class is fitted with FPFH patch features (the BTF baseline) in the same memory bank, not Point-MAE: a
fit with
  enough Point-MAE training to separate a dent from sampling noise takes minutes on 2 cores, while FPFH fits
  in
  seconds, separates the dent well and lets the verifier reject the agent's false alarms.
  `prepare_demo(feature="pointmae")` runs the Point-MAE variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from scans.defects import make_defect
from scans.io import write_pcd
from scans.parts import extent, part_mesh, sample_surface, scan_like

DEMO_PART = "pipe_elbow"
DEMO_DEFECT = "concavity"
DEMO_POINTS = 12000
DEMO_TRAIN_SCANS = 4
DEMO_DEFECT_SHARE = 0.04
DEMO_BANK_VIEWS = 2
DEMO_POINTMAE_STEPS = 60  # only used by the Point-MAE variant
LABELS_SUFFIX = (
    ".labels.npy"  # ground truth written next to the test scan (uint8 per point, the scan's order)
)


def demo_scans(seed: int = 0, points: int = DEMO_POINTS) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(normal training scans, one test scan with a dent, its per-point ground truth), deterministic by
    `seed`."""
    mesh = part_mesh(DEMO_PART)
    train = []
    for i in range(DEMO_TRAIN_SCANS):
        clean, normals = sample_surface(mesh, points, seed=seed + i)
        train.append(scan_like(clean, normals, seed=seed + 100 + i)[0].astype(np.float32))
    clean, normals = sample_surface(mesh, points, seed=seed + 50)
    dented, mask, _ = make_defect(clean, normals, DEMO_DEFECT, seed=seed + 7, share=DEMO_DEFECT_SHARE)
    test, _ = scan_like(dented, normals, seed=seed + 150, scale=extent(clean))
    return train, test.astype(np.float32), mask.astype(bool)


def prepare_demo(
    root: str | Path, seed: int = 0, console: Console | None = None, *, feature: str = "fpfh"
) -> tuple[list[Path], Path]:
    """Write the demo scans under `root`, fit the class, and return ([test scan path], fitted class folder).

    The test scan's ground truth goes next to it as `<stem>.labels.npy` (see :func:`ground_truth_for`)."""
    from detector.config import DetectorConfig
    from detector.fitting import fit_class

    root = Path(root)
    train, test, mask = demo_scans(seed)
    for i, scan in enumerate(train):
        write_pcd(root / "train" / f"{DEMO_PART}_normal{i}.pcd", scan)
    test_path = Path(write_pcd(root / "test" / f"{DEMO_PART}_{DEMO_DEFECT}0.pcd", test))
    np.save(test_path.with_name(test_path.stem + LABELS_SUFFIX), mask.astype(np.uint8), allow_pickle=False)
    steps = DEMO_POINTMAE_STEPS if feature == "pointmae" else 0
    config = DetectorConfig(feature=feature, train_steps=steps, bank_views=DEMO_BANK_VIEWS, seed=seed)  # type: ignore[arg-type]
    fitted = fit_class(train, config, names=[f"normal scan {i}" for i in range(len(train))])
    if console is not None:
        info = fitted.info
        console.print(
            f"  fitted ({feature} features): {info['n_train']} normal scans, {info['n_train_patches']} "
            f"patches, memory bank {info['bank_size']}"
        )
    bank_dir = fitted.save(root / "bank")
    return [test_path], bank_dir


def ground_truth_for(scan_path: str | Path) -> np.ndarray | None:
    """The demo's per-point ground truth of a scan it wrote, or None for any other scan."""
    path = Path(scan_path)
    labels = path.with_name(path.stem + LABELS_SUFFIX)
    return np.load(labels, allow_pickle=False).astype(bool) if labels.is_file() else None


@dataclass(frozen=True)
class DemoCheck:
    """How the agent's regions meet the known dent."""

    defect_points: int
    region_overlaps: list[float]  # share of each reported region's points that lie in the dent, report order
    region_verdicts: list[str]
    dent_recall: float  # share of the dent's points inside some reported region

    @property
    def found(self) -> bool:
        """A region the agent named lies (at least a quarter) in the dent and the bank confirmed it."""
        return any(o >= 0.25 and v == "confirmed" for o, v in zip(self.region_overlaps, self.region_verdicts))

    def summary(self) -> str:
        hits = [
            f"region {i + 1} ({v}): {100 * o:.0f}% in the dent"
            for i, (o, v) in enumerate(zip(self.region_overlaps, self.region_verdicts))
            if o > 0
        ]
        head = "dent FOUND" if self.found else "dent NOT found"
        return (
            f"{head}: {self.defect_points} dent points, {100 * self.dent_recall:.0f}% of them inside a "
            "flagged "
            f"region; " + ("; ".join(hits) if hits else "no region touches the dent")
        )


def check_against_ground_truth(
    regions: list[np.ndarray], verdicts: list[str], truth: np.ndarray
) -> DemoCheck:
    """Compare flagged regions (point indices into the scan) with the dent's ground truth mask."""
    covered = np.zeros(len(truth), dtype=bool)
    overlaps = []
    for region in regions:
        idx = np.asarray(region, dtype=np.int64)
        covered[idx] = True
        overlaps.append(float(truth[idx].mean()) if idx.size else 0.0)
    recall = float(covered[truth].mean()) if truth.any() else 0.0
    return DemoCheck(
        defect_points=int(truth.sum()),
        region_overlaps=overlaps,
        region_verdicts=list(verdicts),
        dent_recall=recall,
    )
