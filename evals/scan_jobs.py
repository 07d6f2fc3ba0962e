"""One scan job: every pending method and backend on one test scan, yielding one result row per name.

The scan is read once and the Point-MAE analysis (the backbone forward pass) is computed once and shared by
the
full-bank method, the recon-error method and every backend, so they are compared on exactly the same numbers
and
the expensive part is not repeated. A failure (unreadable scan, backbone pass, a method, a backend) is a row
with
its reason, never a crash of the run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.pipeline import InspectionConfig
from agent.secrets import Redactor, secrets_in
from evals.config import BackendSpec
from evals.methods import REGISTRY as METHODS
from evals.methods import MethodInput
from evals.store import ScanResult, safe_name
from scans.datasets import Sample


@dataclass(frozen=True)
class ScanJob:
    cls: str
    scan: str  # unique id of the scan within its class (file stem, disambiguated if needed)
    sample: Sample
    names: tuple[str, ...]  # what still has to run on this scan


@dataclass(frozen=True)
class JobContext:
    """What a scan job needs besides the scan; picklable, so a Ray worker can rebuild everything from it."""

    fit_dirs: dict[tuple[str, str], str]  # (class, feature) -> fitted class folder
    backends: dict[str, BackendSpec]
    inspection: InspectionConfig
    fallback: bool
    seed: int
    transcript_root: str | None


class Resources:
    """Fitted classes and backends, each loaded once per run (or per Ray task): a scan job asks, this keeps
    them.

    A backend whose construction failed is remembered and raised for every scan, so the failure is recorded
    per
    scan without retrying the construction each time."""

    def __init__(self) -> None:
        self._fits: dict[str, Any] = {}
        self._backends: dict[str, Any] = {}

    def fit(self, directory: str):
        from detector.fitted import FittedClass

        if directory not in self._fits:
            self._fits[directory] = FittedClass.load(directory)
        return self._fits[directory]

    def backend(self, spec: BackendSpec):
        from agent.backends import get_backend

        cached = self._backends.get(spec.label)
        if cached is None:
            try:
                cached = get_backend(spec.name, **spec.kwargs)
            except Exception as exc:  # noqa: BLE001 -- recorded per scan by the caller, never fatal for the run
                cached = exc
            self._backends[spec.label] = cached
        if isinstance(cached, Exception):
            raise cached
        return cached


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def run_scan(job: ScanJob, ctx: JobContext, resources: Resources) -> Iterator[ScanResult]:
    """Every pending method and backend on one scan, yielding one result per name as soon as it is done."""
    base = {
        "class": job.cls,
        "scan": job.scan,
        "path": str(job.sample.path),
        "defect_type": job.sample.defect_type,
    }
    try:
        loaded = job.sample.load()
    except Exception as exc:  # noqa: BLE001 -- an unreadable scan is recorded for each name, the run goes on
        for name in job.names:
            yield ScanResult(
                {
                    **base,
                    "name": name,
                    "kind": _kind(name, ctx),
                    "status": "failed",
                    "reason": f"scan unreadable: {_failure(exc)}",
                }
            )
        return
    points = loaded.points
    label = int(loaded.object_label)
    mask = loaded.mask
    if mask is None and label == 0:
        mask = np.zeros(len(points), dtype=bool)
    base.update(label=label, n_points=len(points))

    analysis, analyse_s, analyse_error = None, 0.0, None
    if any(_needs_backbone(n, ctx) for n in job.names):
        started = time.perf_counter()
        try:
            analysis = resources.fit(ctx.fit_dirs[(job.cls, "pointmae")]).analyse(points)
        except Exception as exc:  # noqa: BLE001 -- recorded for every name that needs the backbone, the run goes on
            analyse_error = f"backbone pass failed: {_failure(exc)}"
        analyse_s = time.perf_counter() - started

    for name in job.names:
        row = {**base, "name": name, "kind": _kind(name, ctx), "status": "ok", "reason": None}
        if analyse_error is not None and _needs_backbone(name, ctx):
            yield ScanResult({**row, "status": "failed", "reason": analyse_error})
            continue
        started = time.perf_counter()
        if name in ctx.backends:
            result = _run_backend(ctx.backends[name], job, ctx, resources, points, mask, analysis, row)
            shared = analyse_s
        else:
            entry = METHODS[name]
            scan = MethodInput(
                cls=job.cls,
                scan=job.scan,
                points=points,
                analysis=analysis,
                fit=lambda feature: resources.fit(ctx.fit_dirs[(job.cls, feature)]),
                seed=ctx.seed,
                verify_budget=ctx.inspection.max_verify_fraction,
            )
            try:
                scores, object_score = entry.run(scan)
            except Exception as exc:  # noqa: BLE001 -- a method failing on one scan is recorded, not fatal
                yield ScanResult({**row, "status": "failed", "reason": f"{name} failed: {_failure(exc)}"})
                continue
            row.update(
                object_score=float(object_score),
                verified_fraction=entry.verified_fraction,
                verdict=_method_verdict(entry, job, ctx, resources, float(object_score)),
            )
            result = ScanResult(row, scores=scores)
            shared = analyse_s if entry.feature == "pointmae" else 0.0
        own = time.perf_counter() - started
        row.update(own_s=round(own, 4), analyse_s=round(shared, 4), seconds=round(own + shared, 4))
        yield result


def _kind(name: str, ctx: JobContext) -> str:
    return "backend" if name in ctx.backends else "method"


def _method_verdict(
    entry, job: ScanJob, ctx: JobContext, resources: Resources, object_score: float
) -> str | None:
    """'defective' / 'normal' against the class's object threshold of the method's fit, as agent.run's
    report.json
    says it (methods without a fit give none)."""
    from detector.calibration import OBJECT_THRESHOLD, verdict_of

    if entry.feature is None or not entry.has_threshold:
        return None
    fitted = resources.fit(ctx.fit_dirs[(job.cls, entry.feature)])
    return verdict_of(object_score, fitted.thresholds.get(OBJECT_THRESHOLD))


def _needs_backbone(name: str, ctx: JobContext) -> bool:
    return name in ctx.backends or METHODS[name].feature == "pointmae"


def _run_backend(
    spec: BackendSpec,
    job: ScanJob,
    ctx: JobContext,
    resources: Resources,
    points: np.ndarray,
    mask: np.ndarray | None,
    analysis,
    row: dict,
) -> ScanResult:
    from agent.pipeline import inspect_scan
    from detector.calibration import verdict_of

    try:
        backend = resources.backend(spec)
        fitted = resources.fit(ctx.fit_dirs[(job.cls, "pointmae")])
        transcript = None
        if ctx.transcript_root is not None:
            transcript = Path(ctx.transcript_root) / safe_name(spec.label) / job.cls / f"{job.scan}.jsonl"
            transcript.parent.mkdir(parents=True, exist_ok=True)
        guidance = spec.guidance_for(job.sample.defect_type)
        config = ctx.inspection if guidance is None else replace(ctx.inspection, guidance=guidance)
        inspection = inspect_scan(
            points,
            fitted,
            backend,
            config=config,
            transcript_path=transcript,
            analysis=analysis,
            use_fallback=ctx.fallback,
        )
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
        prompt_tokens=int(outcome.usage.prompt_tokens),
        completion_tokens=int(outcome.usage.completion_tokens),
        tool_calls=int(outcome.n_tool_calls),
        turns=int(outcome.turns),
        fallback_used=bool(outcome.fallback_used),
        fallback_reason=outcome.fallback_reason,
        reporting_backend=outcome.backend,
        regions=[
            {
                "n_points": int(f.size),
                "verdict": v.verdict,
                "confidence": float(v.confidence),
                "reason": v.reason,
            }
            for f, v in zip(flagged, inspection.verification.regions)
        ],
        **_region_counts(points, mask, flagged),
    )
    if outcome.error:
        row.update(status="failed", reason=outcome.error)
        return ScanResult(row)
    return ScanResult(row, scores=inspection.point_scores, regions=region_of_point)


def _region_counts(points: np.ndarray, mask: np.ndarray | None, flagged: list[np.ndarray]) -> dict:
    """GT regions and how many were named; flagged regions and how many hold no GT-anomalous point."""
    from evals.regions import false_region_count, region_hits

    counts = {
        "n_flagged_regions": len(flagged),
        "n_gt_regions": None,
        "n_gt_regions_found": None,
        "n_false_regions": None,
    }
    if mask is None:
        return counts
    flagged_mask = np.zeros(len(points), dtype=bool)
    for region in flagged:
        flagged_mask[region] = True
    found, n_regions = region_hits(points, mask, flagged_mask)
    counts.update(
        n_gt_regions=n_regions,
        n_gt_regions_found=found,
        n_false_regions=false_region_count(points, mask, [r for r in flagged if r.size]),
    )
    return counts
