"""Writers for one inspected scan's output folder, and the terminal summary.

Folder contract (other tools read it): `report.json`, `scores.npy` (one float32 per input point, input order),
`scores.ply` (heat map: x,y,z, colour, float `anomaly`), `regions.png` (render of the scan with the flagged regions) and
`transcript.jsonl` (written by the loop as it runs), plus the `.scanagent` marker that lets a rerun replace the folder.
`staged_dir` gives a scan its folder under a temporary name and renames it into place only when everything was
written, so a failed scan leaves no half-written output folder, and it never replaces a folder it did not write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent.pipeline import Inspection
from scans import staging
from scans.io import write_scores
from scans.render import render_regions_png

SCAN_OUTPUT_KIND = "scan output"  # the output marker's kind (scans.staging)


def staged_dir(out_dir: str | os.PathLike) -> AbstractContextManager[Path]:
    """An empty marked staging folder beside `out_dir`; on success it replaces `out_dir` (refused with OutputError
    when `out_dir` is not an earlier output of a scan), on any error it is removed."""
    return staging.staged_dir(out_dir, SCAN_OUTPUT_KIND)


def write_outputs(inspection: Inspection, out_dir: str | os.PathLike, *, source: str, render: bool = True) -> Path:
    """Write report.json, scores.npy/.ply and regions.png into `out_dir` (created; transcript left in place)."""
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".outputs.", dir=target))
    try:
        report = inspection.report()
        report["source"] = source
        write_scores(tmp / "scores", inspection.points, inspection.point_scores)
        if render:
            regions = inspection.flagged_regions()
            labels = [f"{v.verdict}: {v.reason[:40]}" for v in inspection.verification.regions]
            render_regions_png(tmp / "regions.png", inspection.points, regions, labels,
                               title=f"{Path(source).name}: object score {inspection.object_score:.3g}")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        for item in tmp.iterdir():
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def print_summary(inspection: Inspection, source: str, console: Console | None = None) -> None:
    """A readable summary: regions, reasons, verdicts, object score, share verified, tokens, time."""
    console = console or Console()
    report = inspection.report()
    fallback = report["fallback"]
    head = (f"[bold]{source}[/bold]  object score [bold]{report['object_score']:.4g}[/bold]  "
            f"verified {100 * report['verified_fraction']:.1f}% of {report['n_points']} points  "
            f"backend {report['backend']}" + (f" -> fallback {report['reporting_backend']}" if fallback["used"] else ""))
    console.print(head)
    if fallback["used"]:
        console.print(f"  [yellow]fallback:[/yellow] {fallback['reason']}")
    guidance = report.get("guidance")
    if guidance and not guidance["used"]:
        console.print(f"  [yellow]guidance not used:[/yellow] {guidance['note']}")
    registration = report.get("registration")
    if registration and registration["doubtful"]:
        console.print(f"  [yellow]registration doubtful[/yellow] (fitness {registration['fitness']:.2f}): the scan "
                      "does not align with the class template, so every score is suspect — is it the same part?")
    table = Table(show_header=True, header_style="bold")
    for col in ("verdict", "patches", "points", "max dist", "conf", "reason"):
        table.add_column(col)
    for r in report["regions"]:
        dist = r.get("max_distance")
        table.add_row(r["verdict"], ",".join(map(str, r["patch_ids"][:8])), str(r["point_count"]),
                      "-" if dist is None else f"{dist:.3g}", f"{r['confidence']:.2f}", r["reason"][:60])
    console.print(table)
    usage = report["usage"]
    console.print(f"  tokens {usage.get('prompt_tokens', 0)} in / {usage.get('completion_tokens', 0)} out, "
                  f"{report['tool_calls']} tool calls, {report['seconds'].get('total', 0):.2f} s")
