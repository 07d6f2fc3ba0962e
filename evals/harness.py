"""The eval harness: every detector method and agent backend on the same test scans, resumable, local or on
Ray.

This module plans a run and drives it: pick the classes and test scans, fit (or reuse) each class
(evals.fits), run every pending (name, scan) as scan jobs (evals.scan_jobs) on an executor (evals.executors),
append each row to the store (evals.store), then write the report (evals.report).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

from agent.pipeline import InspectionConfig
from agent.secrets import Redactor, secrets_in
from evals.config import (
    BackendSpec,
    HarnessConfig,
    HarnessError,
    ensure_quick_bench,
    parse_backend,
    quick_bench_config,
    quick_detector_config,
)
from evals.executors import run_local, run_ray
from evals.fits import dataset_root, ensure_fit, fit_dir
from evals.methods import DEFAULT_METHODS, METHODS
from evals.scan_jobs import JobContext, ScanJob
from evals.store import RESULTS_FILE, RUN_FILE, ResultStore, ScanResult, safe_name
from scans import strict_json
from scans.datasets import Dataset, Sample, open_dataset
from scans.files import atomic_write_text
from scans.progress import Progress

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "RESULTS_FILE",
    "BackendSpec",
    "HarnessConfig",
    "HarnessError",
    "ResultStore",
    "RunOutcome",
    "ScanResult",
    "dataset_root",
    "ensure_fit",
    "ensure_quick_bench",
    "fit_dir",
    "parse_backend",
    "plan",
    "quick_bench_config",
    "quick_detector_config",
    "run_harness",
    "safe_name",
    "scan_ids",
    "select_tests",
]

RowHook = Callable[[dict], None]


def select_tests(samples: list[Sample], limit: int | None) -> list[Sample]:
    """All test scans, or `limit` of them alternating defective and normal (so both kinds stay), in name
    order."""
    if limit is None or limit >= len(samples):
        return list(samples)
    defective = sorted((s for s in samples if s.label != 0), key=lambda s: str(s.path))
    normal = sorted((s for s in samples if s.label == 0), key=lambda s: str(s.path))
    chosen: list[Sample] = []
    while len(chosen) < limit and (defective or normal):
        for pool in (defective, normal):
            if pool and len(chosen) < limit:
                chosen.append(pool.pop(0))
    return sorted(chosen, key=lambda s: str(s.path))


def scan_ids(samples: list[Sample]) -> list[str]:
    """Unique ids per class: the file stem, prefixed with the defect type where stems repeat (MVTec's
    000.tiff)."""
    stems = [s.path.stem for s in samples]
    ids = [f"{s.defect_type}_{s.path.stem}" if stems.count(s.path.stem) > 1 else s.path.stem for s in samples]
    seen: dict[str, int] = {}
    out = []
    for scan in ids:
        seen[scan] = seen.get(scan, 0) + 1
        out.append(scan if seen[scan] == 1 else f"{scan}_{seen[scan]}")
    return out


@dataclass
class RunOutcome:
    out: Path
    ran: int  # (name, scan) results produced by this run
    skipped: int  # already done before this run
    failed: int  # failed results produced by this run
    seconds: float
    summary: dict | None = None


def plan(
    config: HarnessConfig, dataset: Dataset
) -> tuple[list[str], dict[str, list[tuple[str, Sample]]], dict]:
    """(classes, {class: [(scan id, sample)]}, limit info) for this run."""
    available = list(dataset.classes())
    classes = list(config.classes) if config.classes else available
    unknown = [c for c in classes if c not in available]
    if unknown:
        raise HarnessError(f"{config.data}: unknown classes {unknown}; available: {', '.join(available)}")
    tests: dict[str, list[tuple[str, Sample]]] = {}
    limited: dict[str, list[int]] = {}
    for cls in classes:
        every = list(dataset.test(cls))
        chosen = select_tests(every, config.limit)
        tests[cls] = list(zip(scan_ids(chosen), chosen))
        limited[cls] = {
            "selected": len(chosen),
            "total": len(every),
            "scans": [scan for scan, _ in tests[cls]],
        }
    return classes, tests, limited


def run_harness(
    config: HarnessConfig,
    *,
    progress: Progress | None = None,
    on_row: RowHook | None = None,
    write_report: bool = True,
) -> RunOutcome:
    """Fit (or reuse) each class, run every pending (name, scan), then write the summary, tables, plots and
    HTML.

    `on_row(row)` is called after each row is durably stored (tests use it to interrupt a run).
    KeyboardInterrupt
    propagates after the store is closed: what was stored stays valid and the next run resumes from it."""
    started = time.perf_counter()
    out = Path(config.out)
    dataset = open_dataset(config.data)
    classes, tests, limited = plan(config, dataset)  # bad input fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)

    fits: dict[str, dict[str, dict]] = {}
    for cls in classes:
        for feature in config.features():
            fits.setdefault(cls, {})[feature] = ensure_fit(
                out, dataset, cls, feature, config.detector, progress, config.init_backbone
            )
    _write_run_meta(out, config, classes, limited, fits)

    store = ResultStore(out)
    done = store.done()
    jobs: list[ScanJob] = []
    skipped = 0
    for cls in classes:
        for scan, sample in tests[cls]:
            pending = tuple(n for n in config.names if (n, cls, scan) not in done)
            skipped += len(config.names) - len(pending)
            if pending:
                jobs.append(ScanJob(cls=cls, scan=scan, sample=sample, names=pending))
    ctx = JobContext(
        fit_dirs={(cls, feature): info["dir"] for cls, per in fits.items() for feature, info in per.items()},
        backends={b.label: b for b in config.backends},
        inspection=replace(config.inspection, seed=config.seed),
        fallback=config.fallback,
        seed=config.seed,
        transcript_root=str(out / "transcripts") if config.transcripts else None,
    )

    total = sum(len(j.names) for j in jobs)
    ran = failed = 0
    results = (
        run_ray(jobs, ctx, config.ray_address) if config.executor == "ray" and jobs else run_local(jobs, ctx)
    )
    with store, closing(results):  # closing: an interrupt stops Ray tasks now, not at garbage collection
        if progress is not None:
            progress("scans", 0, total, "")
        for result in results:
            row = store.append(result)
            ran += 1
            failed += row["status"] != "ok"
            if progress is not None:
                progress("scans", ran, total, f"{row['name']} {row['class']}/{row['scan']}")
            if on_row is not None:
                on_row(row)
    outcome = RunOutcome(
        out=out, ran=ran, skipped=skipped, failed=failed, seconds=time.perf_counter() - started
    )
    if write_report:
        from evals.report import write_all

        outcome.summary = write_all(out, progress=progress)
    return outcome


def _write_run_meta(out: Path, config: HarnessConfig, classes: list[str], limited: dict, fits: dict) -> None:
    meta = {
        "data": config.data,
        "classes": classes,
        "methods": list(config.methods),
        "backends": [
            {"label": b.label, "name": b.name, "kwargs": b.kwargs, "guidance": b.guidance}
            for b in config.backends
        ],
        "names": list(config.names),
        "limit": config.limit,
        "tests": limited,
        "fits": fits,
        "executor": config.executor,
        "seed": config.seed,
        "fallback": config.fallback,
        "prices_per_1k": {"prompt": config.price_prompt, "completion": config.price_completion},
        "detector": config.detector.to_dict(),
        "inspection": _inspection_dict(config.inspection),
        "command": config.command,
        "init_backbone": None if config.init_backbone is None else str(config.init_backbone),
    }
    meta = Redactor.for_run(*(secrets_in(b.kwargs) for b in config.backends))(
        meta
    )  # keys in kwargs and command
    atomic_write_text(
        out / RUN_FILE,
        strict_json.dumps(meta, missing_as_null=True, indent=1, sort_keys=True),
    )


def _inspection_dict(inspection: InspectionConfig) -> dict:
    data = {k: v for k, v in inspection.__dict__.items() if k != "budget"}
    data["budget"] = inspection.budget.model_dump()
    return data
