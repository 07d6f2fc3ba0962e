"""`index.html` in a run's output root: one row per scan folder, linking its viewer, sorted by object score.

Why it reads the folders rather than the run's memory: the page shows what is on disk, so scans inspected into
the same
root by earlier runs are listed too and every link works. A folder whose report.json cannot be read gets a row
that
says so instead of stopping the page.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment

from agent.viewer.page import redact
from scans.files import atomic_write_text

INDEX_NAME = "index.html"
GENERATOR = (
    '<meta name="generator" content="scanagent index">'  # an index.html without it is the user's: kept
)


def _row(folder: Path) -> dict:
    link = f"{quote(folder.name)}/"
    row = {
        "name": folder.name,
        "sort": float("-inf"),
        "viewer": link + "viewer.html" if (folder / "viewer.html").is_file() else None,
    }
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        regions = report["regions"]
        score = float(report["object_score"])
        verdicts = [r["verdict"] for r in regions]
        fallback = report.get("fallback") or {}
        registration = report.get("registration") or {}
        row.update(
            sort=score,
            object_score=f"{score:.4g}",
            named=len(regions),
            confirmed=verdicts.count("confirmed"),
            verified=f"{100 * float(report['verified_fraction']):.1f}%",
            backend=str(report.get("backend", "?")),
            source=str(report.get("source", "")),
            report=link + "report.json",
            png=link + "regions.png" if (folder / "regions.png").is_file() else None,
            warning=" ".join(
                w
                for w in (
                    f"fallback {report.get('reporting_backend')}" if fallback.get("used") else "",
                    "registration doubtful" if registration.get("doubtful") else "",
                )
                if w
            ),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        row["problem"] = f"{folder / 'report.json'}: unreadable ({type(exc).__name__}: {exc})"
    return row


def write_index(out_root: str | os.PathLike) -> Path | None:
    """Write `<out_root>/index.html` over every scan folder in it (one holding report.json); None if there is
    none, or
    if an index.html there was not written by scanagent (it is left alone)."""
    root = Path(out_root)
    existing = root / INDEX_NAME
    if existing.exists() and (
        not existing.is_file() or GENERATOR not in existing.read_text(errors="replace")
    ):
        return None
    folders = (
        sorted(p for p in root.iterdir() if p.is_dir() and (p / "report.json").is_file())
        if root.is_dir()
        else []
    )
    if not folders:
        return None
    rows = sorted((_row(folder) for folder in folders), key=lambda r: (-r["sort"], r["name"]))
    template = Environment(autoescape=True).from_string(
        resources.files("agent.viewer").joinpath("index.html.j2").read_text(encoding="utf-8")
    )
    return atomic_write_text(root / INDEX_NAME, template.render(rows=redact(rows)))
