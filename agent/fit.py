"""`python -m agent.fit --data <layout>:<root> --cls <class> --out <dir>` (or `--train <dir of normal
scans>`).

Fits one class — Point-MAE trained on the class's normal scans, a memory bank of its patch features,
thresholds calibrated on normal data — and writes it as one folder that `python -m agent.run --bank <dir>`
reads. Exit codes: 0 fitted, 2 bad input (missing/empty/unreadable scans, unknown class or layout, bad
options, an --out that is not a fit or cannot be written, checked before fitting). Nothing is written unless
the fit succeeds (the folder appears in one rename).

Why the work lives in :func:`fit_from_options`: tests and other code call it directly and get a
:class:`FitReport`; :func:`main` only parses arguments, draws progress bars and prints the summary.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.cli_args import EXIT_BAD_INPUT, EXIT_OK, console_say, run_cli
from agent.quiet import quiet_third_party
from scans.progress import Progress as ProgressCallback

DEFAULT_MESH_POINTS = 30000


class FitInputError(ValueError):
    """Bad input for a class fit; the message names the file, folder or option and the problem (exit 2)."""


@dataclass(frozen=True)
class FitOptions:
    """What to fit and how (the CLI's flags). Exactly one of ``train`` or ``data`` + ``cls`` names the
    scans."""

    out: Path
    data: str | None = None  # "<layout>:<root>", see evals.datasets
    cls: str | None = None
    train: Path | None = None  # a folder of normal scans
    feature: str = "pointmae"  # "pointmae" | "fpfh" (the BTF baseline)
    steps: int | None = None  # Point-MAE training steps (default: DetectorConfig's)
    coreset_ratio: float | None = None
    seed: int = 0
    init: Path | None = None  # pretrained backbone folder (tools.pointmae_train CLI output)
    preset: str = "small"  # "small" (2 CPU cores) | "paper" (Point-MAE's published size)
    mesh_points: int = DEFAULT_MESH_POINTS
    # align scans to the first template + coordinate bank (unaligned scans); None: the fit measures whether
    # training scans are aligned already and decides (detector.registration_choice)
    register: bool | None = None


@dataclass
class FitReport:
    """What was fitted, for the summary table and for callers."""

    out: Path
    class_name: str
    feature: str
    scans: list[str]
    points: list[int]
    patches: int
    bank_size: int
    feature_dim: int
    train_steps: int
    seconds: dict[str, float] = field(default_factory=dict)  # read, train, features, bank, total
    peak_memory_mb: float = 0.0
    thresholds: dict[str, float] = field(default_factory=dict)
    registration_fitness: list[float] = field(
        default_factory=list
    )  # per training scan; empty without --register
    coord_bank_size: int = 0
    registration: dict = field(default_factory=dict)  # what was decided and why (fitted.json info)
    surface_cues: bool = False


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------------ inputs
def _scan_files_in(folder: Path) -> list[Path]:
    from scans.io import is_scan_file

    return sorted(p for p in folder.iterdir() if p.is_file() and is_scan_file(p))


@dataclass(frozen=True)
class TrainingScan:
    """One training scan to read: its file, and the dataset sample when it came from --data (a layout may
    preprocess what it reads, e.g. MVTec's background-plane removal, and a fit must see what the tests
    see)."""

    path: Path
    sample: object | None = None  # evals.datasets.Sample

    def read(self, mesh_points: int, seed: int) -> np.ndarray:
        from scans.io import read_scan

        if self.sample is not None:
            return self.sample.load(mesh_points=mesh_points, seed=seed).points
        return read_scan(self.path, mesh_points=mesh_points, seed=seed).points


def training_scans(options: FitOptions) -> tuple[str, list[TrainingScan]]:
    """(class name, training scans) from --train or --data/--cls; FitInputError when there are none."""
    if options.train is not None:
        if options.data is not None or options.cls is not None:
            raise FitInputError("give either --train DIR, or --data <layout>:<root> with --cls, not both")
        folder = Path(options.train)
        if not folder.exists():
            raise FitInputError(f"{folder}: training folder does not exist")
        if not folder.is_dir():
            raise FitInputError(f"{folder}: --train must be a folder of normal scans")
        files = _scan_files_in(folder)
        if not files:
            from scans.io import SUPPORTED_EXTENSIONS

            raise FitInputError(
                f"{folder}: no scans in this folder (looked for {', '.join(SUPPORTED_EXTENSIONS)})"
            )
        return folder.resolve().name, [TrainingScan(f) for f in files]
    if options.data is None or options.cls is None:
        raise FitInputError("name the training scans: --train DIR, or --data <layout>:<root> --cls CLASS")
    # evals sits above agent in the import order; only this optional path needs its dataset layouts
    from scans.datasets import DatasetError, open_dataset

    try:
        dataset = open_dataset(options.data)
    except DatasetError as exc:
        raise FitInputError(str(exc)) from None
    known = dataset.classes()
    if options.cls not in known:
        raise FitInputError(
            f"unknown class {options.cls!r} in {options.data}; known classes: {', '.join(known) or '(none)'}"
        )
    samples = dataset.train(options.cls)
    if not samples:
        raise FitInputError(f"{dataset.class_dir(options.cls)}: class {options.cls!r} has no training scans")
    return options.cls, [TrainingScan(sample.path, sample) for sample in samples]


def _check_out(out: Path) -> None:
    """Fail before an expensive fit if --out could not be written (FittedClass.save would refuse it at the
    end):
    a file, an unwritable place, or a folder of the user's that is not a fit."""
    from detector.config import FitError
    from detector.persistence import check_save_target

    try:
        check_save_target(out)
    except FitError as exc:
        raise FitInputError(f"--out {exc}") from None


def _detector_config(options: FitOptions):
    from detector.config import DetectorConfig
    from detector.pointmae_config import PointMAEConfig

    if options.feature not in ("pointmae", "fpfh"):
        raise FitInputError(f"--feature must be pointmae or fpfh, got {options.feature!r}")
    if options.preset not in ("small", "paper"):
        raise FitInputError(f"--preset must be small or paper, got {options.preset!r}")
    if options.steps is not None and options.steps < 0:
        raise FitInputError(f"--steps must be >= 0, got {options.steps}")
    if options.coreset_ratio is not None and not 0 < options.coreset_ratio <= 1:
        raise FitInputError(f"--coreset-ratio must be in (0, 1], got {options.coreset_ratio}")
    if options.mesh_points < 1:
        raise FitInputError(f"--mesh-points must be >= 1, got {options.mesh_points}")
    backbone = PointMAEConfig.paper() if options.preset == "paper" else PointMAEConfig.small()
    values: dict = {
        "feature": options.feature,
        "backbone": backbone,
        "seed": options.seed,
        "register": options.register,
    }
    if options.steps is not None:
        values["train_steps"] = options.steps
    if options.coreset_ratio is not None:
        values["coreset_ratio"] = options.coreset_ratio
    return DetectorConfig(**values)


def _load_init(path: Path, config):
    from detector.pointmae import load_backbone

    try:
        return load_backbone(path, expect=config.backbone)
    except (OSError, ValueError) as exc:
        raise FitInputError(f"--init {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------------- work
def fit_from_options(options: FitOptions, progress: ProgressCallback | None = None) -> FitReport:
    """Read the class's normal scans, fit, save to ``options.out``; FitInputError for any bad input.

    ``progress(stage, done, total)``: stage "read" per scan, "train" per Point-MAE step, "features" per bank
    view."""
    from detector.config import FitError
    from detector.fitting import fit_class
    from scans.io import ScanError

    start = time.perf_counter()
    config = _detector_config(options)
    out = Path(options.out)
    _check_out(out)
    class_name, inputs = training_scans(options)
    files = [scan.path for scan in inputs]
    init = None
    if options.init is not None:
        if options.feature != "pointmae":
            raise FitInputError("--init gives a Point-MAE backbone; it does not apply to --feature fpfh")
        init = _load_init(Path(options.init), config)
    scans: list[np.ndarray] = []
    for i, scan in enumerate(inputs):
        try:
            scans.append(scan.read(options.mesh_points, options.seed))
        except ScanError as exc:
            raise FitInputError(f"unreadable training scan: {exc}") from None
        except (
            ValueError
        ) as exc:  # a layout's preprocessing or ground-truth check (evals.datasets.DatasetError)
            raise FitInputError(f"{scan.path}: {exc}") from None
        if progress is not None:
            progress("read", i + 1, len(inputs))
    read_s = time.perf_counter() - start
    try:
        fitted = fit_class(
            scans, config, init_backbone=init, progress=progress, names=[str(p) for p in files]
        )
        fitted.info["class"] = class_name
        fitted.save(out)
    except FitError as exc:
        raise FitInputError(str(exc)) from None
    info = fitted.info
    seconds = {
        "read": read_s,
        "register": info.get("register_s", 0.0),
        "train": info["train_s"],
        "features": info["features_s"],
        "bank": info["bank_s"],
        "total": time.perf_counter() - start,
    }
    return FitReport(
        out=out,
        class_name=class_name,
        feature=config.feature,
        scans=[str(p) for p in files],
        points=[len(s) for s in scans],
        patches=int(info["n_train_patches"]),
        bank_size=int(info["bank_size"]),
        feature_dim=int(fitted.bank.features.shape[1]),
        train_steps=config.train_steps if config.feature == "pointmae" else 0,
        seconds=seconds,
        peak_memory_mb=peak_memory_mb(),
        thresholds=dict(fitted.thresholds),
        registration_fitness=list(info.get("registration_fitness", [])),
        coord_bank_size=int(info.get("coord_bank_size", 0)),
        registration=dict(info.get("registration_decision", {})),
        surface_cues=fitted.cues is not None,
    )


# ----------------------------------------------------------------------------------------------------- CLI
FIT_EPILOG = """examples:
  scanagent fit --train my_parts/normal/ --out banks/bracket
  scanagent fit --data anomaly-shapenet:dev-bench --cls flange --out banks/flange --register
  (without --register / --no-register the fit measures whether the scans are aligned and decides)
  (`python -m agent.fit ...` is the same command)

exit codes: 0 ok, 2 bad input (unreadable or too few scans, bad dataset spec or class, bad option)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agent.fit",
        description=__doc__.split("\n\n")[0],
        epilog=FIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("training scans (one of)")
    src.add_argument("--train", type=Path, help="folder of normal scans of one class")
    src.add_argument(
        "--data", help="dataset as <layout>:<root> (anomaly-shapenet, real3d-ad, mvtec3d, folder)"
    )
    src.add_argument("--cls", help="class to fit from --data")
    p.add_argument("--out", type=Path, required=True, help="fitted class folder to write")
    p.add_argument(
        "--feature",
        choices=["pointmae", "fpfh"],
        default="pointmae",
        help="pointmae: the learned detector; fpfh: the BTF baseline (no training)",
    )
    p.add_argument("--steps", type=int, help="Point-MAE training steps (default: the detector's)")
    p.add_argument("--coreset-ratio", type=float, help="share of training patches kept in the bank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, help="pretrained backbone folder to start training from")
    p.add_argument(
        "--preset",
        choices=["small", "paper"],
        default="small",
        help="backbone size: small (CPU) or paper (Point-MAE's, wants a GPU)",
    )
    p.add_argument(
        "--mesh-points", type=int, default=DEFAULT_MESH_POINTS, help="points sampled from mesh inputs"
    )
    pose = p.add_mutually_exclusive_group()
    pose.add_argument(
        "--register",
        action="store_const",
        const=True,
        dest="register",
        help="scans are not pre-aligned: register each to the first training scan (FPFH+RANSAC+ICP) "
        "and add a bank of registered coordinates (default: the fit measures and decides)",
    )
    pose.add_argument(
        "--no-register",
        action="store_const",
        const=False,
        dest="register",
        help="scans are pre-aligned: never register (default: the fit measures and decides)",
    )
    return p


def summary_table(report: FitReport) -> Table:
    table = Table(title=f"fitted {report.class_name} ({report.feature})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    pts = report.points
    table.add_row("training scans", f"{len(report.scans)} ({min(pts):,}-{max(pts):,} points)")
    table.add_row("patches", f"{report.patches:,}")
    table.add_row("bank", f"{report.bank_size:,} x {report.feature_dim}")
    if report.train_steps:
        table.add_row("Point-MAE steps", str(report.train_steps))
    decision = report.registration
    if decision:
        how = "decided by the fit" if decision.get("decided_by") == "fit" else "forced by the flag"
        said = "register" if decision.get("register") else "no registration"
        why = f": {decision['reason']}" if decision.get("reason") else ""
        table.add_row("pose", f"{said} ({how}){why}")
    if report.registration_fitness:
        fit = report.registration_fitness
        table.add_row(
            "registration",
            f"onto {Path(report.scans[0]).name}; fitness of the others "
            f"{min(fit):.2f}-{max(fit):.2f}; "
            f"coordinate bank {report.coord_bank_size:,} points",
        )
    s = report.seconds
    registering = f"register {s['register']:.1f}, " if s.get("register") else ""
    table.add_row(
        "time",
        f"{s['total']:.1f} s (read {s['read']:.1f}, {registering}train {s['train']:.1f}, "
        f"features {s['features']:.1f}, bank {s['bank']:.1f})",
    )
    table.add_row("peak memory", f"{report.peak_memory_mb:,.0f} MB")
    table.add_row(
        "surface cues",
        "surface distance + uncovered rim, fused with the bank" if report.surface_cues else "none",
    )
    if report.thresholds:
        table.add_row(
            "normal patch p95 / max",
            f"{report.thresholds['patch_p95']:.4g} / {report.thresholds['patch_max']:.4g}",
        )
    if "object_threshold" in report.thresholds:
        table.add_row(
            "object threshold",
            f"{report.thresholds['object_threshold']:.4g} (normal object scores "
            f"max {report.thresholds['object_normal_max']:.4g}, leave-one-template-out: a scan above "
            "it is called defective)",
        )
    else:
        table.add_row("object threshold", "none (needs two or more training scans): runs give no verdict")
    table.add_row("written", str(report.out))
    return table


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    console = console or Console(stderr=False)
    args = build_parser().parse_args(argv)
    quiet_third_party()
    options = FitOptions(
        out=args.out,
        data=args.data,
        cls=args.cls,
        train=args.train,
        feature=args.feature,
        steps=args.steps,
        coreset_ratio=args.coreset_ratio,
        seed=args.seed,
        init=args.init,
        preset=args.preset,
        mesh_points=args.mesh_points,
        register=args.register,
    )
    return run_cli(
        lambda: _fit_with_progress(options, console),
        console_say(console),
        [(FitInputError, "error", EXIT_BAD_INPUT)],
    )


def _fit_with_progress(options: FitOptions, console: Console) -> int:
    """The fit behind progress bars (they stop before any error is shown), then its summary table."""
    labels = {"read": "reading scans", "train": "training Point-MAE", "features": "bank feature views"}
    with Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bars:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int, detail: str = "") -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(labels.get(stage, stage), total=total)
            bars.update(tasks[stage], completed=done, total=total)

        report = fit_from_options(options, progress)
    console.print(summary_table(report))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
