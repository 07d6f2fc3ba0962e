"""The end of a run over several scans: one table in the terminal and summary.csv / summary.json in --out.

Why: a folder of scans is inspected to sort parts, and the sorting (which scans are defective, how sure,
where) should
not have to be scrolled together from one table per scan. Failed scans are rows too, so nothing is silently
missing.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scans import strict_json
from scans.files import atomic_write_text

SUMMARY_FIELDS = (
    "scan",
    "verdict",
    "object_score",
    "threshold",
    "regions",
    "confirmed_regions",
    "seconds",
    "outputs",
    "summary",
)


@dataclass
class ScanRow:
    """One scan's line of the run summary (verdict 'failed' with the error as summary when it could not
    run)."""

    scan: str
    verdict: str  # "defective" | "normal" | "no verdict" | "failed"
    object_score: float | None
    threshold: float | None
    regions: int
    confirmed_regions: int
    seconds: float
    outputs: str
    summary: str

    @classmethod
    def from_report(cls, report: dict, source: str, outputs: str) -> ScanRow:
        return cls(
            scan=source,
            verdict=report["verdict"] or "no verdict",
            object_score=report["object_score"],
            threshold=report["threshold"],
            regions=len(report["regions"]),
            confirmed_regions=sum(r["verdict"] == "confirmed" for r in report["regions"]),
            seconds=round(float(report["seconds"].get("total", 0.0)), 3),
            outputs=outputs,
            summary=report["summary"],
        )

    @classmethod
    def failed(cls, source: str, error: str) -> ScanRow:
        return cls(
            scan=source,
            verdict="failed",
            object_score=None,
            threshold=None,
            regions=0,
            confirmed_regions=0,
            seconds=0.0,
            outputs="",
            summary=error,
        )


def write_run_summary(rows: list[ScanRow], out_root: str | os.PathLike) -> tuple[Path, Path]:
    """summary.csv and summary.json in `out_root` (each written whole, then renamed)."""
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    writer.writerows(asdict(row) for row in rows)
    counts = {v: sum(r.verdict == v for r in rows) for v in ("defective", "normal", "no verdict", "failed")}
    document = {"counts": counts, "scans": [asdict(row) for row in rows]}
    atomic_write_text(root / "summary.csv", buffer.getvalue())
    atomic_write_text(root / "summary.json", strict_json.dumps(document, missing_as_null=True, indent=2))
    return root / "summary.csv", root / "summary.json"


def print_run_summary(rows: list[ScanRow], console: Console) -> None:
    """One table over every scan of the run, then the verdict counts."""
    table = Table(show_header=True, header_style="bold", title="run summary")
    table.add_column("scan", no_wrap=True)
    for col in ("verdict", "object score", "threshold", "regions confirmed", "seconds"):
        table.add_column(col, no_wrap=True)
    colours = {"defective": "red", "normal": "green", "failed": "red"}
    for row in rows:
        colour = colours.get(row.verdict, "yellow")
        table.add_row(
            Path(row.scan).name,
            f"[{colour}]{row.verdict}[/{colour}]",
            "-" if row.object_score is None else f"{row.object_score:.4g}",
            "-" if row.threshold is None else f"{row.threshold:.4g}",
            f"{row.confirmed_regions} of {row.regions}",
            f"{row.seconds:.2f}",
        )
    console.print(table)
    counts = {v: sum(r.verdict == v for r in rows) for v in ("defective", "normal", "no verdict", "failed")}
    console.print("  " + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
