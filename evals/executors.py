"""Where scan jobs run: this process, or Ray tasks that load the fits from disk.

Rows always come back to the calling process, which alone writes the store, so both executors produce the same
files. A Ray task loads its class fit itself (from the folder named in the job context), so nothing large is
shipped to workers.
"""

from __future__ import annotations

from collections.abc import Iterator

from evals.config import HarnessError
from evals.scan_jobs import JobContext, Resources, ScanJob, run_scan
from evals.store import ScanResult


def run_local(jobs: list[ScanJob], ctx: JobContext) -> Iterator[ScanResult]:
    """Scan jobs one after another in this process, sharing one set of loaded fits and backends."""
    resources = Resources()
    for job in jobs:
        yield from run_scan(job, ctx, resources)


def _scan_task(job: ScanJob, ctx: JobContext) -> list[ScanResult]:
    return list(run_scan(job, ctx, Resources()))


def run_ray(jobs: list[ScanJob], ctx: JobContext, address: str | None) -> Iterator[ScanResult]:
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
