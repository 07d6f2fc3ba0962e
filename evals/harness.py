"""The eval harness: every detector method and agent backend on the same test scans, resumable, local or on Ray.

Why it is shaped like this:
- One fit per (class, feature), cached under ``<out>/fits/<class>/<feature>-<hash>/`` where the hash covers the detector
  config and the training files, so a rerun (or another run into the same folder) never refits what it already has,
  and a changed config or dataset never silently reuses a stale fit.
- One *scan job* per test scan runs every pending method and backend on it: the scan is read once and the Point-MAE
  analysis (the backbone forward pass) is computed once and shared by the full-bank method, the recon-error method and
  every backend, so they are compared on exactly the same numbers and the expensive part is not repeated.
- Results are appended to ``<out>/results.jsonl`` one (name, scan) at a time, after that row's per-point scores were
  written (atomically) to ``<out>/scores/<name>/<class>/<scan>.npy``. A row therefore always has its scores, a rerun
  skips every (name, scan) with an ``ok`` row, and Ctrl-C at any moment leaves a consistent partial result. Failed rows
  are kept (with their reason) and retried by the next run; the latest row of a (name, scan) wins.
- The executor only decides *where* scan jobs run (this process, or Ray tasks that load the fits from disk); rows are
  always written by this process, so both executors produce the same files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np

from agent.pipeline import InspectionConfig
from agent.secrets import Redactor, secrets_in
from detector.fitted import DetectorConfig
from detector.pointmae import PointMAEConfig
from scans import strict_json
from scans.datasets import Dataset, Sample, open_dataset

METHODS = ("pointmae-bank", "btf", "recon", "random", "oracle-regions")
DEFAULT_METHODS = ("pointmae-bank", "btf", "recon", "random")  # oracle-regions is a diagnostic: asked for by name
METHOD_FEATURE: dict[str, str | None] = {"pointmae-bank": "pointmae", "btf": "fpfh", "recon": "pointmae",
                                         "random": None, "oracle-regions": "pointmae"}
# Share of points the memory bank scores for each method (the x axis of "accuracy vs share verified").
# oracle-regions searches the whole bank to choose which points keep their scores, so it counts as 1.0 (read it at
# the verification budget, not at its x position).
METHOD_VERIFIED_FRACTION = {"pointmae-bank": 1.0, "btf": 1.0, "recon": 0.0, "random": 0.0, "oracle-regions": 1.0}
RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
FIT_META = "fitted.json"
QUICK_CLASSES = ("flange", "gear")
QUICK_TRAIN_STEPS = 24

Executor = Literal["local", "ray"]
ProgressFn = Callable[[str, int, int, str], None]     # (stage, done, total, detail)
RowHook = Callable[[dict], None]


class HarnessError(ValueError):
    """Unusable harness input (unknown method or backend, bad spec); the message names the problem."""


# ------------------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class BackendSpec:
    """One backend as named on the command line: `label` is the result name, `name` the registry entry."""

    label: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_backend(text: str, *, base_url: str | None = None, seed: int = 0,
                  llm_kwargs: dict[str, Any] | None = None) -> BackendSpec:
    """`policy`, `random-regions`, `hf[:<model>]`, `openai:<model>`, `langchain:<module:Class>` or any registry name.

    `llm_kwargs` (from `--backend-kwargs`) go to the server backends (openai, langchain), e.g.
    `{"llama_cpp_compat": true}` for a llama.cpp server whose chat format drops `role: tool` messages."""
    from agent.backends import REGISTRY

    text = text.strip()
    name, _, arg = text.partition(":")
    kwargs: dict[str, Any] = {}
    if name not in REGISTRY:
        raise HarnessError(f"unknown backend {name!r} in {text!r}; known: {', '.join(sorted(REGISTRY))}")
    if name == "openai":
        if arg:
            kwargs["model"] = arg
        if base_url:
            kwargs["base_url"] = base_url
    elif name == "langchain":
        if arg:
            kwargs["chat_model"] = arg
    elif name == "hf":
        if arg:
            kwargs["model"] = arg
        kwargs["seed"] = seed
    elif name == "random-regions":
        kwargs["seed"] = seed
    elif arg:
        kwargs["model"] = arg
    if llm_kwargs and name in ("openai", "langchain"):
        kwargs.update(llm_kwargs)
    return BackendSpec(label=text, name=name, kwargs=kwargs)


def quick_detector_config(seed: int = 0) -> DetectorConfig:
    """A small, fast backbone for `--quick` and tests: the pipeline end to end, not the detector's best numbers."""
    backbone = PointMAEConfig(width=96, depth=2, heads=4, decoder_depth=1, decoder_heads=4, embed_dims=(32, 64, 96),
                              inference_groups=256, feature_layers=(0, 1))
    return DetectorConfig(backbone=backbone, train_steps=QUICK_TRAIN_STEPS, train_batch=4, bank_views=2, seed=seed)


def quick_bench_config(seed: int = 0):
    from scans.bench import BenchConfig

    return BenchConfig(points=4000, templates=3, normal_per_class=2, defects_per_type=1,
                       defect_types=("bulge", "concavity", "hole"), seed=seed)


def ensure_quick_bench(out: Path, seed: int = 0) -> str:
    """Build (or reuse) the tiny dev benchmark under `<out>/quick-bench`; returns its dataset spec."""
    from scans.bench import build_benchmark

    root = Path(out) / "quick-bench"
    if not (root / "manifest.json").is_file():
        build_benchmark(root, classes=list(QUICK_CLASSES), config=quick_bench_config(seed), scans_dir=None,
                        overwrite=True)
    return f"anomaly-shapenet:{root}"


@dataclass(frozen=True)
class HarnessConfig:
    data: str                                       # "<layout>:<root>"
    out: Path
    classes: tuple[str, ...] | None = None          # None: every class of the dataset
    methods: tuple[str, ...] = DEFAULT_METHODS
    backends: tuple[BackendSpec, ...] = ()
    limit: int | None = None                        # test scans per class (a balanced, deterministic subset)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    init_backbone: Path | None = None               # pretrained Point-MAE folder the class fits start from
    inspection: InspectionConfig = field(default_factory=InspectionConfig)
    executor: Executor = "local"
    ray_address: str | None = None
    price_prompt: float | None = None               # currency per 1k prompt tokens
    price_completion: float | None = None           # currency per 1k completion tokens
    fallback: bool = True                           # False: a backend failure is recorded as failed, no policy rescue
    transcripts: bool = True
    seed: int = 0
    command: str = ""                               # how the run was started (for the report)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise HarnessError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        labels = [*self.methods, *(b.label for b in self.backends)]
        if len(set(labels)) != len(labels):
            raise HarnessError(f"a method or backend is named twice: {labels}")
        if not labels:
            raise HarnessError("nothing to run: give --methods and/or --backends")
        if self.limit is not None and self.limit < 1:
            raise HarnessError(f"--limit must be >= 1, got {self.limit}")
        if self.executor not in ("local", "ray"):
            raise HarnessError(f"unknown executor {self.executor!r}; use local or ray")

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.methods, *(b.label for b in self.backends))

    def features(self) -> list[str]:
        """Which class fits the run needs: pointmae for the bank, recon and every backend; fpfh for btf."""
        needed = {METHOD_FEATURE[m] for m in self.methods} - {None}
        if self.backends:
            needed.add("pointmae")
        return [f for f in ("pointmae", "fpfh") if f in needed]  # type: ignore[misc]


def safe_name(label: str) -> str:
    """A result name as a folder name (backend labels may hold ':' and '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "backend"


# ------------------------------------------------------------------------------------------------------ results store
class ResultStore:
    """`<out>/results.jsonl` plus the per-point score files; appends are durable and ordered npy-before-row."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / RESULTS_FILE
        self._file = None

    @staticmethod
    def key(row: dict) -> tuple[str, str, str]:
        return (row["name"], row["class"], row["scan"])

    def rows(self) -> list[dict]:
        """Every stored row, latest last; a line torn by a kill mid-write is ignored (its npy may exist, harmlessly)."""
        if not self.path.is_file():
            return []
        rows = []
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # torn last line
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows

    def latest(self) -> dict[tuple[str, str, str], dict]:
        latest: dict[tuple[str, str, str], dict] = {}
        for row in self.rows():
            latest[self.key(row)] = row
        return latest

    def done(self) -> set[tuple[str, str, str]]:
        """(name, class, scan) with an ok row whose score file is present."""
        return {k for k, row in self.latest().items()
                if row.get("status") == "ok" and (self.out / row.get("scores", "")).is_file()}

    def __enter__(self) -> Self:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # drop a torn last line so the next row starts clean
                with self.path.open("r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def append(self, result: ScanResult) -> dict:
        assert self._file is not None, "use ResultStore as a context manager"
        row = dict(result.row)
        if result.scores is not None:
            rel = Path("scores") / safe_name(row["name"]) / row["class"] / f"{row['scan']}.npy"
            _save_npy(self.out / rel, np.asarray(result.scores, dtype=np.float32))
            row["scores"] = rel.as_posix()
            if result.regions is not None:
                rel_regions = rel.with_name(f"{row['scan']}.regions.npy")
                _save_npy(self.out / rel_regions, np.asarray(result.regions, dtype=np.int32))
                row["regions_file"] = rel_regions.as_posix()
        line = strict_json.dumps(row, missing_as_null=True, sort_keys=True, default=_json_default)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return row


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, array, allow_pickle=False)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------------------------------ scan jobs
@dataclass(frozen=True)
class ScanJob:
    cls: str
    scan: str                      # unique id of the scan within its class (file stem, disambiguated if needed)
    sample: Sample
    names: tuple[str, ...]         # what still has to run on this scan


@dataclass(frozen=True)
class JobContext:
    """What a scan job needs besides the scan; picklable, so a Ray worker can rebuild everything from it."""

    fit_dirs: dict[tuple[str, str], str]          # (class, feature) -> fitted class folder
    backends: dict[str, BackendSpec]
    inspection: InspectionConfig
    fallback: bool
    seed: int
    transcript_root: str | None


@dataclass
class ScanResult:
    row: dict
    scores: np.ndarray | None = None
    regions: np.ndarray | None = None   # int32 (N,) index of the flagged region holding each point, -1 elsewhere


_FIT_CACHE: dict[str, Any] = {}
_BACKEND_CACHE: dict[str, Any] = {}


def _load_fit(directory: str):
    """A fitted class, loaded once per process (Ray workers keep theirs between tasks)."""
    from detector.fitted import FittedClass

    if directory not in _FIT_CACHE:
        _FIT_CACHE[directory] = FittedClass.load(directory)
    return _FIT_CACHE[directory]


def _backend(spec: BackendSpec):
    """A backend, constructed once per process; a construction failure is remembered and raised for every scan."""
    from agent.backends import get_backend

    cached = _BACKEND_CACHE.get(spec.label)
    if cached is None:
        try:
            cached = get_backend(spec.name, **spec.kwargs)
        except Exception as exc:  # noqa: BLE001 -- recorded per scan by the caller, never fatal for the run
            cached = exc
        _BACKEND_CACHE[spec.label] = cached
    if isinstance(cached, Exception):
        raise cached
    return cached


def clear_process_caches() -> None:
    """Forget loaded fits and backends (tests register fake backends under reused names)."""
    _FIT_CACHE.clear()
    _BACKEND_CACHE.clear()


def scan_seed(seed: int, *parts: str) -> int:
    """A per-scan seed that depends only on the run seed and the scan's names (not on run order or executor)."""
    return zlib.crc32(":".join([str(seed), *parts]).encode()) & 0x7FFFFFFF


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def run_scan(job: ScanJob, ctx: JobContext) -> Iterator[ScanResult]:
    """Every pending method and backend on one scan, yielding one result per name as soon as it is done."""
    base = {"class": job.cls, "scan": job.scan, "path": str(job.sample.path), "defect_type": job.sample.defect_type}
    try:
        loaded = job.sample.load()
    except Exception as exc:  # noqa: BLE001 -- an unreadable scan is recorded for each name, the run goes on
        for name in job.names:
            yield ScanResult({**base, "name": name, "kind": _kind(name, ctx), "status": "failed",
                              "reason": f"scan unreadable: {_failure(exc)}"})
        return
    points = loaded.points
    label = int(loaded.object_label)
    mask = loaded.mask
    if mask is None and label == 0:
        mask = np.zeros(len(points), dtype=bool)
    base.update(label=label, n_points=len(points))

    analysis, analyse_s, analyse_error = None, 0.0, None
    if any(METHOD_FEATURE.get(n) == "pointmae" or n in ctx.backends for n in job.names):
        started = time.perf_counter()
        try:
            analysis = _load_fit(ctx.fit_dirs[(job.cls, "pointmae")]).analyse(points)
        except Exception as exc:  # noqa: BLE001 -- recorded for every name that needs the backbone, the run goes on
            analyse_error = f"backbone pass failed: {_failure(exc)}"
        analyse_s = time.perf_counter() - started

    for name in job.names:
        row = {**base, "name": name, "kind": _kind(name, ctx), "status": "ok", "reason": None}
        needs_backbone = name in ctx.backends or METHOD_FEATURE.get(name) == "pointmae"
        if analyse_error is not None and needs_backbone:
            yield ScanResult({**row, "status": "failed", "reason": analyse_error})
            continue
        started = time.perf_counter()
        if name in ctx.backends:
            result = _run_backend(ctx.backends[name], job, ctx, points, mask, analysis, row)
            shared = analyse_s
        else:
            try:
                scores, object_score = _run_method(name, job, ctx, points, analysis)
            except Exception as exc:  # noqa: BLE001 -- a method failing on one scan is recorded, not fatal
                yield ScanResult({**row, "status": "failed", "reason": f"{name} failed: {_failure(exc)}"})
                continue
            row.update(object_score=float(object_score), verified_fraction=METHOD_VERIFIED_FRACTION[name],
                       verdict=_method_verdict(name, job, ctx, float(object_score)))
            result = ScanResult(row, scores=scores)
            shared = analyse_s if METHOD_FEATURE[name] == "pointmae" else 0.0
        own = time.perf_counter() - started
        row.update(own_s=round(own, 4), analyse_s=round(shared, 4), seconds=round(own + shared, 4))
        yield result


# the fit whose calibrated object threshold gives a method's verdict (methods without one give none)
METHOD_THRESHOLD_FIT = {"pointmae-bank": "pointmae", "btf": "fpfh", "oracle-regions": "pointmae"}


def _method_verdict(name: str, job: ScanJob, ctx: JobContext, object_score: float) -> str | None:
    """'defective' / 'normal' against the class's object threshold, as agent.run's report.json says it."""
    from detector.calibration import OBJECT_THRESHOLD, verdict_of

    feature = METHOD_THRESHOLD_FIT.get(name)
    if feature is None:
        return None
    return verdict_of(object_score, _load_fit(ctx.fit_dirs[(job.cls, feature)]).thresholds.get(OBJECT_THRESHOLD))


def _kind(name: str, ctx: JobContext) -> str:
    return "backend" if name in ctx.backends else "method"


def _run_method(name: str, job: ScanJob, ctx: JobContext, points: np.ndarray, analysis) -> tuple[np.ndarray, float]:
    n = len(points)
    if name == "pointmae-bank":  # M3DM's recipe: every patch through the bank
        fitted = _load_fit(ctx.fit_dirs[(job.cls, "pointmae")])
        result = fitted.score(analysis)
        scores = np.empty(n, dtype=np.float32)
        scores[result.point_ids] = result.point_scores
        return scores, result.object_score
    if name == "btf":  # BTF: FPFH features, the same bank
        return _load_fit(ctx.fit_dirs[(job.cls, "fpfh")]).score_full(points)
    if name == "recon":  # Point-MAE reconstruction error alone, no bank
        scores = np.asarray(analysis.point_stats["recon_error"], dtype=np.float32)
        return scores, float(scores.max())
    if name == "random":
        rng = np.random.default_rng(scan_seed(ctx.seed, "random", job.cls, job.scan))
        return rng.random(n, dtype=np.float32), float(rng.random())
    if name == "oracle-regions":
        return _oracle_regions(_load_fit(ctx.fit_dirs[(job.cls, "pointmae")]), analysis,
                               ctx.inspection.max_verify_fraction)
    raise HarnessError(f"unknown method {name!r}")


def _oracle_regions(fitted, analysis, budget: float) -> tuple[np.ndarray, float]:
    """The top-B full-bank points under the verifier's prior: the points the full bank scores highest, up to the
    verification budget B, keep their bank scores and every other point gets the verifier's low prior. Not a usable
    method (it searched the whole bank to choose) and not a strict ceiling (an agent that named exactly the defect's
    points would beat it); it shows how much of the full bank's accuracy survives the low prior at that budget when
    the budget goes where the bank itself would put it."""
    from agent.verifier import prior_floor, prior_scores

    n = len(analysis.points)
    result = fitted.score(analysis)
    full = np.empty(n, dtype=np.float32)
    full[result.point_ids] = result.point_scores
    scores = prior_scores(analysis, n, prior_floor(fitted))
    top = np.argsort(-full, kind="stable")[: int(budget * n)]
    scores[top] = full[top]
    return scores, result.object_score


def _run_backend(spec: BackendSpec, job: ScanJob, ctx: JobContext, points: np.ndarray, mask: np.ndarray | None,
                 analysis, row: dict) -> ScanResult:
    from agent.pipeline import inspect_scan
    from detector.calibration import verdict_of

    try:
        backend = _backend(spec)
        fitted = _load_fit(ctx.fit_dirs[(job.cls, "pointmae")])
        transcript = None
        if ctx.transcript_root is not None:
            transcript = Path(ctx.transcript_root) / safe_name(spec.label) / job.cls / f"{job.scan}.jsonl"
            transcript.parent.mkdir(parents=True, exist_ok=True)
        inspection = inspect_scan(points, fitted, backend, config=ctx.inspection, transcript_path=transcript,
                                  analysis=analysis, use_fallback=ctx.fallback)
    except Exception as exc:  # noqa: BLE001 -- a failing backend is a result, not a crash
        row.update(status="failed", reason=Redactor.for_run(secrets_in(spec.kwargs)).text(_failure(exc)))
        return ScanResult(row)
    outcome = inspection.outcome
    flagged = [np.asarray(r, dtype=np.int64) for r in inspection.flagged_regions()]
    region_of_point = np.full(len(points), -1, dtype=np.int32)
    for index in reversed(range(len(flagged))):  # the first region wins where regions share points
        region_of_point[flagged[index]] = index
    row.update(
        object_score=float(inspection.object_score),
        verdict=verdict_of(float(inspection.object_score), inspection.verification.object_threshold),
        verified_fraction=float(inspection.verification.verified_fraction),
        prompt_tokens=int(outcome.usage.prompt_tokens), completion_tokens=int(outcome.usage.completion_tokens),
        tool_calls=int(outcome.n_tool_calls), turns=int(outcome.turns),
        fallback_used=bool(outcome.fallback_used), fallback_reason=outcome.fallback_reason,
        reporting_backend=outcome.backend,
        regions=[{"n_points": int(f.size), "verdict": v.verdict, "confidence": float(v.confidence),
                  "reason": v.reason} for f, v in zip(flagged, inspection.verification.regions)],
        **_region_counts(points, mask, flagged),
    )
    if outcome.error:
        row.update(status="failed", reason=outcome.error)
        return ScanResult(row)
    return ScanResult(row, scores=inspection.point_scores, regions=region_of_point)


def _region_counts(points: np.ndarray, mask: np.ndarray | None, flagged: list[np.ndarray]) -> dict:
    """GT regions and how many were named; flagged regions and how many hold no GT-anomalous point."""
    from evals.metrics import point_regions

    counts = {"n_flagged_regions": len(flagged), "n_gt_regions": None, "n_gt_regions_found": None,
              "n_false_regions": None}
    if mask is None:
        return counts
    gt_regions = point_regions(points, mask)
    flagged_mask = np.zeros(len(points), dtype=bool)
    for region in flagged:
        flagged_mask[region] = True
    hit = gt_regions[flagged_mask & (gt_regions >= 0)]
    counts.update(n_gt_regions=int(gt_regions.max()) + 1, n_gt_regions_found=int(np.unique(hit).size),
                  n_false_regions=int(sum(not mask[r].any() for r in flagged if r.size)))
    return counts


# ------------------------------------------------------------------------------------------------------ executors
def _run_local(jobs: list[ScanJob], ctx: JobContext) -> Iterator[ScanResult]:
    for job in jobs:
        yield from run_scan(job, ctx)


def _scan_task(job: ScanJob, ctx: JobContext) -> list[ScanResult]:
    return list(run_scan(job, ctx))


def _run_ray(jobs: list[ScanJob], ctx: JobContext, address: str | None) -> Iterator[ScanResult]:
    """Scan jobs as Ray tasks; results come back to this process, which alone writes the store."""
    try:
        import ray
    except ImportError as exc:
        raise HarnessError("--executor ray needs Ray: pip install 'scanagent[ray]'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pending: list = []
    try:
        task = ray.remote(num_cpus=1)(_scan_task)
        pending = [task.remote(job, ctx) for job in jobs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(ready[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------------ fits
def fit_dir(out: Path, cls: str, feature: str, config: DetectorConfig, train: list[Sample],
            init_hash: str | None = None) -> Path:
    """`<out>/fits/<class>/<feature>-<hash>`: the hash covers the config, the training files (name, size, mtime) and
    the pretrained backbone a Point-MAE fit starts from."""
    settings = replace(config, feature=feature).to_dict()
    if not settings["register"]:
        del settings["register"]  # fits cached before registration existed stay valid
    payload = {"config": settings,
               "train": [[s.path.name, s.path.stat().st_size, int(s.path.stat().st_mtime)] for s in train]}
    if init_hash is not None and feature == "pointmae":
        payload["init"] = init_hash
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return Path(out) / "fits" / cls / f"{feature}-{digest}"


def ensure_fit(out: Path, dataset: Dataset, cls: str, feature: str, config: DetectorConfig,
               progress: ProgressFn | None = None, init_backbone: Path | None = None) -> dict:
    """Fit a class (or reuse its cached fit); returns {"dir", "fit_s", "reused"}. ``init_backbone``: a pretrained
    backbone folder (``python -m tools.pointmae_train``) that Point-MAE fits start from."""
    from detector.fitted import fit_class
    from detector.pointmae import backbone_hash, load_backbone

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

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(f"fit {cls} ({feature})", done, total, stage)

    fitted = fit_class(scans, replace(config, feature=feature), progress=report, names=[str(s.path) for s in train],
                       init_backbone=init)
    fitted.info["fit_s"] = round(time.perf_counter() - started, 3)
    if init is not None:
        fitted.info["init_backbone"] = {"path": str(init_backbone), "hash": backbone_hash(init)}
    fitted.save(directory)
    return {"dir": str(directory), "fit_s": fitted.info["fit_s"], "reused": False}


def dataset_root(dataset: Dataset) -> str:
    return str(getattr(dataset, "root", dataset))


# ------------------------------------------------------------------------------------------------------ planning
def select_tests(samples: list[Sample], limit: int | None) -> list[Sample]:
    """All test scans, or `limit` of them alternating defective and normal (so both kinds stay), in name order."""
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
    """Unique ids per class: the file stem, prefixed with the defect type where stems repeat (MVTec's 000.tiff)."""
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
    ran: int                       # (name, scan) results produced by this run
    skipped: int                   # already done before this run
    failed: int                    # failed results produced by this run
    seconds: float
    summary: dict | None = None


def plan(config: HarnessConfig, dataset: Dataset) -> tuple[list[str], dict[str, list[tuple[str, Sample]]], dict]:
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
        limited[cls] = {"selected": len(chosen), "total": len(every), "scans": [scan for scan, _ in tests[cls]]}
    return classes, tests, limited


def run_harness(config: HarnessConfig, *, progress: ProgressFn | None = None, on_row: RowHook | None = None,
                write_report: bool = True) -> RunOutcome:
    """Fit (or reuse) each class, run every pending (name, scan), then write the summary, tables, plots and HTML.

    `on_row(row)` is called after each row is durably stored (tests use it to interrupt a run). KeyboardInterrupt
    propagates after the store is closed: what was stored stays valid and the next run resumes from it."""
    started = time.perf_counter()
    out = Path(config.out)
    dataset = open_dataset(config.data)
    classes, tests, limited = plan(config, dataset)  # bad input fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)

    fits: dict[str, dict[str, dict]] = {}
    for cls in classes:
        for feature in config.features():
            fits.setdefault(cls, {})[feature] = ensure_fit(out, dataset, cls, feature, config.detector, progress,
                                                           config.init_backbone)
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
        backends={b.label: b for b in config.backends}, inspection=replace(config.inspection, seed=config.seed),
        fallback=config.fallback, seed=config.seed,
        transcript_root=str(out / "transcripts") if config.transcripts else None)

    total = sum(len(j.names) for j in jobs)
    ran = failed = 0
    results = _run_ray(jobs, ctx, config.ray_address) if config.executor == "ray" and jobs else _run_local(jobs, ctx)
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
    outcome = RunOutcome(out=out, ran=ran, skipped=skipped, failed=failed, seconds=time.perf_counter() - started)
    if write_report:
        from evals.report import write_all

        outcome.summary = write_all(out, progress=progress)
    return outcome


def _write_run_meta(out: Path, config: HarnessConfig, classes: list[str], limited: dict, fits: dict) -> None:
    meta = {
        "data": config.data, "classes": classes, "methods": list(config.methods),
        "backends": [{"label": b.label, "name": b.name, "kwargs": b.kwargs} for b in config.backends],
        "names": list(config.names), "limit": config.limit, "tests": limited, "fits": fits,
        "executor": config.executor, "seed": config.seed, "fallback": config.fallback,
        "prices_per_1k": {"prompt": config.price_prompt, "completion": config.price_completion},
        "detector": config.detector.to_dict(), "inspection": _inspection_dict(config.inspection),
        "command": config.command,
        "init_backbone": None if config.init_backbone is None else str(config.init_backbone),
    }
    meta = Redactor.for_run(*(secrets_in(b.kwargs) for b in config.backends))(meta)  # keys in kwargs and command
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(strict_json.dumps(meta, missing_as_null=True, indent=1, sort_keys=True,
                                     default=_json_default))
    os.replace(tmp, out / RUN_FILE)


def _inspection_dict(inspection: InspectionConfig) -> dict:
    data = {k: v for k, v in inspection.__dict__.items() if k != "budget"}
    data["budget"] = inspection.budget.model_dump()
    return data
