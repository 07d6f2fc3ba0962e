"""Writers for one inspected scan's output folder, and the terminal summary.

Folder contract (other tools read it): `report.json`, `scores.npy` (one float32 per input point, input order),
`scores.ply` (heat map: x,y,z, colour, float `anomaly`), `regions.png` (render of the scan with the flagged
regions) and
`transcript.jsonl` (written by the loop as it runs), `viewer.html` (agent.viewer: the same cloud in 3-D,
offline), plus
the `.scanagent` marker that lets a rerun replace the folder. A folder run adds `index.html` in the output
root.
`staged_dir` gives a scan its folder under a temporary name and renames it into place only when everything was
written, so a failed scan leaves no half-written output folder, and it never replaces a folder it did not
write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from agent.pipeline import Inspection
from agent.sampled import spread_to_all
from agent.viewer import write_viewer
from scans import staging, strict_json
from scans.io import Scan, write_scores
from scans.regions_png import render_regions_png

SCAN_OUTPUT_KIND = "scan output"  # the output marker's kind (scans.staging)


def staged_dir(out_dir: str | os.PathLike) -> AbstractContextManager[Path]:
    """An empty marked staging folder beside `out_dir`; on success it replaces `out_dir` (refused with
    OutputError
    when `out_dir` is not an earlier output of a scan), on any error it is removed."""
    return staging.staged_dir(out_dir, SCAN_OUTPUT_KIND)


def region_legend(regions: list[dict]) -> list[str]:
    """One legend line per report.json region, numbered by its `id`: verdict, evidence and the whole
    reason."""
    lines = []
    for region in regions:
        evidence = f"{region['point_count']} points, confidence {region['confidence']:.2f}"
        if region.get("max_distance") is not None and region.get("threshold") is not None:
            evidence += f", bank {region['max_distance']:.3g} vs threshold {region['threshold']:.3g}"
        lines.append(f"{region['id']} {region['verdict']} ({evidence}): {region['reason']}")
    return lines


def write_outputs(
    inspection: Inspection,
    out_dir: str | os.PathLike,
    *,
    source: str,
    render: bool = True,
    seed: int = 0,
    scan: Scan | None = None,
    analysed_rows: np.ndarray | None = None,
) -> Path:
    """Write report.json, scores.npy/.ply, regions.png and viewer.html into `out_dir` (created; transcript
    left in
    place). `render=False` skips both pictures (the PNG and the page).

    With the `scan` the inspection was made from, scores.npy holds one value per row of the scan's file, in
    its order (NaN for rows dropped as non-finite or as far outliers), and report.json counts those rows. When
    only `analysed_rows` of the scan were inspected (a huge scan, agent.sampled), every other point gets the
    score of its nearest analysed point."""
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".outputs.", dir=target))
    try:
        report = inspection.report()
        report["source"] = source
        points, scores, input_scores = inspection.points, inspection.point_scores, None
        if scan is not None:
            if analysed_rows is not None:
                scores = spread_to_all(scan.points, analysed_rows, scores)
            elif len(scan.points) != len(inspection.points):
                raise ValueError(
                    f"{source}: the inspection has {len(inspection.points)} points, the scan "
                    f"{len(scan.points)}; give the analysed rows"
                )
            points, input_scores = scan.points, scan.to_input_rows(scores)
            report.update(
                n_points=len(scan.points),
                analysed_points=len(inspection.points),
                n_input_rows=len(input_scores),
                dropped_nonfinite=scan.dropped_nonfinite,
                dropped_outliers=scan.dropped_outliers,
            )
        write_scores(tmp / "scores", points, scores, input_scores=input_scores)
        if render:
            regions = inspection.flagged_regions()
            verdict = report["verdict"] or "no verdict"
            title = f"{Path(source).name}: {verdict}, object score {inspection.object_score:.3g}"
            render_regions_png(
                tmp / "regions.png",
                inspection.points,
                regions,
                region_legend(report["regions"]),
                title=title,
                scores=inspection.point_scores,
                verdicts=[r["verdict"] for r in report["regions"]],
                seed=seed,
            )
            write_viewer(
                tmp / "viewer.html",
                inspection.points,
                inspection.point_scores,
                report,
                regions,
                title=title,
                seed=seed,
            )
        text = strict_json.dumps(report, missing_as_null=True, indent=2, sort_keys=True)
        (tmp / "report.json").write_text(text)
        for item in tmp.iterdir():
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def print_summary(
    inspection: Inspection, source: str, console: Console | None = None, *, regions_table: bool = True
) -> None:
    """A readable summary: verdict, object score, share verified, regions with their reasons, tokens, time.
    `regions_table=False` leaves the regions out (a run over many scans ends with one table instead)."""
    console = console or Console()
    report = inspection.report()
    fallback = report["fallback"]
    colour = {"defective": "red", "normal": "green"}.get(report["verdict"], "yellow")
    verdict = (report["verdict"] or "no verdict (uncalibrated)").upper()
    threshold = "" if report["threshold"] is None else f" (threshold {report['threshold']:.4g})"
    head = (
        f"[bold]{source}[/bold]  [bold {colour}]{verdict}[/bold {colour}]  "
        f"object score [bold]{report['object_score']:.4g}[/bold]{threshold}  "
        f"verified {100 * report['verified_fraction']:.1f}% of {report['n_points']} points  "
        f"backend {report['backend']}"
        + (f" -> fallback {report['reporting_backend']}" if fallback["used"] else "")
    )
    console.print(head)
    console.print(f"  {report['summary']}", markup=False)
    if fallback["used"]:
        console.print(f"  [yellow]fallback:[/yellow] {fallback['reason']}")
    guidance = report.get("guidance")
    if guidance and not guidance["used"]:
        console.print(f"  [yellow]guidance not used:[/yellow] {guidance['note']}")
    elif guidance and guidance.get("applied"):
        reader = guidance.get("read", {}).get("reader", "keywords")
        console.print(f"  guidance read ({reader}): {guidance['applied']}", markup=False)
    ignored = (guidance or {}).get("ignored_regions")
    if ignored and ignored["dropped_patches"]:
        where = ", ".join(ignored["regions"])
        dropped = ignored["dropped_patches"]
        console.print(f"  ignored ({where}): took patches {dropped} out of the report", markup=False)
    recognised = (guidance or {}).get("normal_features")
    if recognised:
        dropped = recognised["dropped_patches"]
        done = f"took patches {dropped} out of the report" if dropped else "found none of them in the report"
        kinds = ", ".join(recognised["kinds"])
        console.print(f"  normal features ({kinds}): the learned recogniser {done}", markup=False)
    registration = report.get("registration")
    if registration and registration["doubtful"]:
        console.print(
            f"  [yellow]registration doubtful[/yellow] (fitness {registration['fitness']:.2f}): the scan "
            "does not align with the class template, so every score is suspect — is it the same part?"
        )
    if not regions_table:
        return
    table = Table(show_header=True, header_style="bold")
    for col in ("#", "verdict", "patches", "points", "max dist", "conf", "why (verifier)", "agent's reason"):
        table.add_column(col, overflow="fold")
    for r in report["regions"]:
        dist = r.get("max_distance")
        table.add_row(
            str(r["id"]),
            r["verdict"],
            ",".join(map(str, r["patch_ids"][:8])),
            str(r["point_count"]),
            "-" if dist is None else f"{dist:.3g}",
            f"{r['confidence']:.2f}",
            r["explanation"],
            r["reason"][:60],
        )
    console.print(table)
    usage = report["usage"]
    console.print(
        f"  tokens {usage.get('prompt_tokens', 0)} in / {usage.get('completion_tokens', 0)} out, "
        f"{report['tool_calls']} tool calls, {report['seconds'].get('total', 0):.2f} s"
    )
