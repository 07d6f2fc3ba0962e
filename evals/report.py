"""A harness run for people: summary.json/csv, a README-ready markdown table, plots and one HTML page.

The numbers come from evals.summary (computed from the run's folder alone, so a report can be rebuilt at any
time
with ``write_all(out)``); this module only writes them out.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from evals.store import ResultStore
from evals.summary import summarize
from scans import strict_json
from scans.datasets import Sample, open_dataset
from scans.files import atomic_write_text
from scans.progress import Progress

REPORT_DIR = "report"
MAX_ROC_CLASSES = 4
SCALAR_COLUMNS = ("o_auroc", "p_auroc", "au_pro", "false_alarm_rate", "detection_rate", "region_recall",
                  "false_region_rate", "verified_fraction",
                  "prompt_tokens", "completion_tokens", "tokens", "tool_calls", "wall_p50", "wall_p95",
                  "fit_s", "score_s", "n_scans", "n_failed", "n_fallbacks", "cost_per_scan", "cost_total")


# ------------------------------------------------------------------------------------------------------
# tables
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def summary_csv(summary: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "class", *SCALAR_COLUMNS])
    for name, per_class in summary.items():
        for cls, entry in per_class.items():
            writer.writerow([name, cls, *(_csv_cell(entry.get(c)) for c in SCALAR_COLUMNS)])
    return buffer.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, str):  # a preformatted cell
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and digits == 0):
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


MAIN_COLUMNS: list[tuple[str, str, int]] = [
    ("O-AUROC", "o_auroc", 3), ("P-AUROC", "p_auroc", 3), ("AU-PRO@0.3", "au_pro", 3),
    ("false alarms", "false_alarm_rate", 2), ("detected", "detection_rate", 2),
    ("region recall", "region_recall", 2), ("false regions", "false_region_rate", 2),
    ("share verified", "verified_fraction", 2), ("tokens/scan", "tokens", 0), ("tool calls", "tool_calls", 1),
    ("s/scan p50", "wall_p50", 2), ("s/scan p95", "wall_p95", 2), ("s/scan", "score_s", 2),
    ("fit s", "fit_s", 0), ("failed", "n_failed", 0), ("fallbacks", "n_fallbacks", 0),
]


def _columns(summary: dict) -> list[tuple[str, str, int]]:
    columns = list(MAIN_COLUMNS)
    if any("cost_per_scan" in e.get("mean", {}) for e in summary.values()):
        columns.append(("cost/scan", "cost_per_scan", 5))
    return columns


def _table(rows: list[tuple[str, dict]], columns: list[tuple[str, str, int]], first: str) -> str:
    lines = ["| " + " | ".join([first, *(title for title, _, _ in columns)]) + " |",
             "|" + "|".join([":---", *("---:" for _ in columns)]) + "|"]
    for label, entry in rows:
        lines.append("| " + " | ".join([label, *(_fmt(entry.get(key), d) for _, key, d in columns)]) + " |")
    return "\n".join(lines)


def limit_note(meta: dict) -> str:
    tests = meta["tests"]
    selected = sum(t["selected"] for t in tests.values())
    total = sum(t["total"] for t in tests.values())
    if meta.get("limit") is None or selected == total:
        return f"All {total} test scans of {len(tests)} classes were used (no --limit)."
    return (f"Limited by --limit {meta['limit']}: {selected} of {total} test scans over {len(tests)} classes "
            f"(at most {meta['limit']} per class, defective and normal alternating) — for every method and "
            "backend.")


def budget_note(meta: dict) -> str | None:
    """What each backend's run was allowed to spend per scan (None when no backend ran): the cost columns'
    ceiling."""
    if not meta.get("backends"):
        return None
    inspection = meta.get("inspection") or {}
    budget = inspection.get("budget") or {}
    limits = (("max_turns", "turns"), ("max_tool_calls", "tool calls"), ("max_total_tokens", "tokens"))
    parts = [f"at most {budget[k]:,} {what}" for k, what in limits if budget.get(k)]
    if budget.get("max_context_tokens"):
        parts.append(f"a context window of {budget['max_context_tokens']:,} tokens (the agent is asked to "
                     "report "
                     "before a request would not fit)")
    if inspection.get("max_verify_fraction"):
        parts.append(f"the bank scores at most {inspection['max_verify_fraction']:.0%} of the points")
    return "Agent budget per scan: " + ", ".join(parts) + "." if parts else None


def grouped_reasons(summary: dict, limit: int | None = 4) -> list[tuple[str, str, str, int]]:
    """(method/backend, "failed" | "fell back", reason, count), most frequent first, at most `limit` per kind;
    numbers
    in a reason are folded to N so that alike reasons (token counts, ids) group."""
    out = []
    for name, entry in summary.items():
        mean = entry.get("mean", {})
        for what, key in (("failed", "failure_reasons"), ("fell back", "fallback_reasons")):
            grouped: Counter = Counter()
            for reason, count in mean.get(key, {}).items():
                grouped[re.sub(r"\d+(\.\d+)?", "N", str(reason))[:160]] += count
            out.extend((name, what, reason, count) for reason, count in grouped.most_common(limit))
    return out


def reason_lines(summary: dict, limit: int = 4) -> list[str]:
    """The most frequent failure and fallback reasons per method/backend, as markdown list items."""
    return [f"- {name} {what} x{count}: {reason}"
            for name, what, reason, count in grouped_reasons(summary, limit)]


def markdown_report(summary: dict, meta: dict) -> str:
    """The README-ready table (means over classes) plus per-class O-AUROC and per-defect-type tables."""
    columns = _columns(summary)
    lines = [f"Dataset `{meta['data']}`, classes: {', '.join(meta['classes'])}. {limit_note(meta)}",
             ("Means over classes; AUROC/AU-PRO over the scans that succeeded (failures are counted, not "
              "scored); "
              "share verified = points the memory bank scored; seconds include the shared Point-MAE "
              "pass."), "",
             _table([(n, e.get("mean", {})) for n, e in summary.items()], columns, "method / backend")]
    if budget_note(meta):
        lines += ["", budget_note(meta)]
    reasons = reason_lines(summary)
    if reasons:
        lines += ["", "Most frequent failure and fallback reasons (numbers shown as N):", "", *reasons]
    classes = meta["classes"]
    if len(classes) > 1:
        lines += ["", "O-AUROC / P-AUROC per class:", "",
                  _table([(n, {c: _pair(e.get(c)) for c in classes}) for n, e in summary.items()],
                         [(c, c, -1) for c in classes], "method / backend")]
    types = sorted({t for e in summary.values() for t in e.get("mean", {}).get("per_defect", {})})
    if types:
        rows = []
        for name, entry in summary.items():
            per = entry.get("mean", {}).get("per_defect", {})
            rows.append((name, {t: _pair_defect(per.get(t)) for t in types}))
        lines += ["", "Per defect type: O-AUROC vs normal scans (region recall for backends):", "",
                  _table(rows, [(t, t, -1) for t in types], "method / backend")]
    if meta.get("command"):
        lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def _pair(entry: dict | None) -> str | None:
    if not entry:
        return None
    return str(f"{_fmt(entry.get('o_auroc'))} / {_fmt(entry.get('p_auroc'))}")


def _pair_defect(entry: dict | None) -> str | None:
    if not entry:
        return None
    text = _fmt(entry.get("o_auroc"))
    if entry.get("region_recall") is not None and not (isinstance(entry["region_recall"], float)
                                                       and math.isnan(entry["region_recall"])):
        text += f" ({_fmt(entry['region_recall'], 2)})"
    return str(text)


# ------------------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(names)}


def plot_tradeoff(summary: dict, path: Path, x_key: str, x_label: str, *, log_x: bool = False) -> Path:
    """Mean O-AUROC and P-AUROC of each method/backend against its cost (share verified or tokens per
    scan)."""
    names = [n for n, e in summary.items() if e.get("mean")]
    colours = _colours(names)
    figure = _figure(10, 4.2)
    for position, (metric, title) in enumerate((("p_auroc", "P-AUROC"), ("o_auroc", "O-AUROC")), start=1):
        axes = figure.add_subplot(1, 2, position)
        for name in names:
            mean = summary[name]["mean"]
            x, y = mean.get(x_key), mean.get(metric)
            if x is None or y is None or any(isinstance(v, float) and math.isnan(v) for v in (x, y)):
                continue
            axes.scatter([x], [y], s=70, color=colours[name], label=name, zorder=3)
            axes.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        axes.axhline(0.5, color="0.6", linestyle=":", linewidth=1)
        axes.set_xlabel(x_label)
        axes.set_ylabel(f"{title} (mean over classes)")
        axes.set_ylim(0.0, 1.05)
        if log_x:
            axes.set_xscale("symlog", linthresh=10)
            axes.set_xlim(left=-1)  # token counts are never negative: no mirrored negative decades
        axes.grid(alpha=0.3)
        axes.set_title(f"{title} vs {x_label}")
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_roc(curves: dict, classes: list[str], path: Path) -> Path:
    """Object- and point-level ROC curves per class (first few classes), one line per method/backend."""
    shown = classes[:MAX_ROC_CLASSES]
    names = list(curves)
    colours = _colours(names)
    figure = _figure(4.2 * len(shown), 7.6)
    for col, cls in enumerate(shown):
        for row, (level, title) in enumerate((("object", "object ROC"), ("point", "point ROC"))):
            axes = figure.add_subplot(2, len(shown), row * len(shown) + col + 1)
            for name in names:
                curve = curves[name].get(cls, {}).get(level)
                if curve:
                    axes.plot(curve[0], curve[1], color=colours[name], label=name, linewidth=1.5)
            axes.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
            axes.set_title(f"{cls}: {title}", fontsize=10)
            axes.set_xlabel("false positive rate", fontsize=8)
            axes.set_ylabel("true positive rate", fontsize=8)
            axes.set_xlim(0, 1)
            axes.set_ylim(0, 1.02)
            if row == 1 and col == 0:
                axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_per_class(summary: dict, classes: list[str], path: Path) -> Path:
    """Grouped bars: O-AUROC and P-AUROC of every method/backend per class."""
    names = [n for n, e in summary.items() if e.get("mean")]
    colours = _colours(names)
    figure = _figure(max(7.0, 1.2 * len(classes) * max(len(names), 1) * 0.45 + 3), 7.0)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(classes))
    for position, (metric, title) in enumerate((("o_auroc", "O-AUROC"), ("p_auroc", "P-AUROC")), start=1):
        axes = figure.add_subplot(2, 1, position)
        for i, name in enumerate(names):
            values = [summary[name].get(c, {}).get(metric) for c in classes]
            values = [np.nan if v is None else v for v in values]
            axes.bar(x + (i - (len(names) - 1) / 2) * width, values, width, color=colours[name], label=name)
        axes.axhline(0.5, color="0.5", linestyle=":", linewidth=1)
        axes.set_xticks(x, classes)
        axes.set_ylim(0, 1.05)
        axes.set_ylabel(title)
        axes.grid(axis="y", alpha=0.3)
        if position == 1:
            handles, labels = axes.get_legend_handles_labels()
            figure.legend(handles, labels, fontsize=8, ncol=min(len(names), 5), loc="upper center",
                          frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------------ html
def render_examples(out: Path, meta: dict, directory: Path, max_examples: int = 4) -> list[dict]:
    """Ground truth and flagged regions of a few defective scans (one per class first), for the first
    backend."""
    from scans.regions_png import render_regions_png
    from scans.render import render_points_png

    latest = ResultStore(out).latest()
    name = meta["backends"][0]["label"] if meta["backends"] else (meta["methods"] or [None])[0]
    if name is None or max_examples <= 0:
        return []
    per_class = []
    for cls in meta["classes"]:
        rows = [latest[(name, cls, s)] for s in meta["tests"][cls]["scans"] if (name, cls, s) in latest]
        per_class.append([r for r in rows if r.get("status") == "ok" and r.get("label") == 1])
    chosen: list[dict] = []
    while len(chosen) < max_examples and any(per_class):
        for rows in per_class:
            if rows and len(chosen) < max_examples:
                chosen.append(rows.pop(0))
    directory.mkdir(parents=True, exist_ok=True)
    samples: dict[str, Sample] = {}
    examples = []
    for row in chosen:
        if row["class"] not in {s.cls for s in samples.values()}:
            samples |= {str(s.path): s for s in open_dataset(meta["data"]).test(row["class"])}
        loaded = samples[row["path"]].load()
        stem = row["scan"] if row["scan"].startswith(row["class"]) else f"{row['class']}_{row['scan']}"
        views = ("iso", "top")
        truth = render_points_png(directory / f"{stem}_truth.png", loaded.points, mask=loaded.mask,
                                  title=f"{row['class']}/{row['scan']}: ground truth (red)", views=views)
        if row.get("regions_file"):
            region_of_point = np.load(out / row["regions_file"], allow_pickle=False)
            regions = [np.flatnonzero(region_of_point == i) for i in range(int(region_of_point.max()) + 1)]
            labels = [f"{i + 1}: {r.get('verdict', '?')} ({r.get('confidence', 0):.2f})"
                      for i, r in enumerate(row.get("regions", [])[:len(regions)])]
            labels += [f"{i + 1}" for i in range(len(labels), len(regions))]
            verdicts = [r.get("verdict", "skipped") for r in row.get("regions", [])[:len(regions)]]
            verdicts += ["skipped"] * (len(regions) - len(verdicts))
            # every region passed, empty ones too, so the picture numbers them as the labels do
            flagged = render_regions_png(directory / f"{stem}_flagged.png", loaded.points, regions, labels,
                                         title=f"{name}: flagged regions", views=views, verdicts=verdicts)
        else:
            scores = np.load(out / row["scores"], allow_pickle=False)
            flagged = render_points_png(directory / f"{stem}_flagged.png", loaded.points, scores,
                                        title=f"{name}: per-point scores", views=views)
        examples.append({"name": name, "class": row["class"], "scan": row["scan"],
                         "defect_type": row.get("defect_type"), "object_score": row.get("object_score"),
                         "regions": row.get("regions", []), "truth": truth.relative_to(out).as_posix(),
                         "flagged": flagged.relative_to(out).as_posix()})
    return examples


HTML_TEMPLATE = Path(__file__).resolve().parent / "templates" / "report.html.j2"  # the page, in jinja2


def _html_table(rows: list[tuple[str, dict]], columns: list[tuple[str, str, int]], first: str) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in [first, *(c[0] for c in columns)])
    body = []
    for label, entry in rows:
        cells = "".join(f"<td>{html.escape(_fmt(entry.get(key), d))}</td>" for _, key, d in columns)
        body.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_html(out: Path, summary: dict, meta: dict, plots: dict[str, str], examples: list[dict]) -> Path:
    import jinja2

    classes = meta["classes"]
    types = sorted({t for e in summary.values() for t in e.get("mean", {}).get("per_defect", {})})
    failures = [{"name": name, "what": what, "count": count, "reason": reason}
                for name, what, reason, count in grouped_reasons(summary, limit=None)]
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = environment.from_string(HTML_TEMPLATE.read_text(encoding="utf-8")).render(
        data=meta["data"], classes=classes, limit=limit_note(meta), command=meta.get("command"),
        budget=budget_note(meta),
        main_table=_html_table([(n, e.get("mean", {})) for n, e in summary.items()], _columns(summary),
                               "method / backend"),
        class_table=_html_table([(n, {c: _pair(e.get(c)) for c in classes}) for n, e in summary.items()],
                                [(f"{c} (O / P)", c, -1) for c in classes], "method / backend"),
        defect_table=_html_table([(n, {t: _pair_defect(e.get("mean", {}).get("per_defect", {}).get(t))
                                       for t in types}) for n, e in summary.items()],
                                 [(t, t, -1) for t in types], "method / backend") if types else "",
        failures=failures[:30], plots=plots, examples=examples)
    return atomic_write_text(out / "report.html", page)


# ------------------------------------------------------------------------------------------------------ all
# of it
def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_all(out: str | os.PathLike, *, progress: Progress | None = None, examples: int = 4) -> dict:
    """summary.json, summary.csv, table.md, plots (report/*.png) and report.html for the run in `out`."""
    out = Path(out)
    summary, curves, meta = summarize(out, progress)
    _write_text(out / "summary.json", strict_json.dumps(summary, missing_as_null=True, indent=1))
    _write_text(out / "summary.csv", summary_csv(summary))
    _write_text(out / "table.md", markdown_report(summary, meta))
    report_dir = out / REPORT_DIR
    report_dir.mkdir(exist_ok=True)
    if progress is not None:
        progress("report", len(meta["classes"]), len(meta["classes"]), "plots")
    plots = {
        "verified": plot_tradeoff(summary, report_dir / "accuracy_vs_verified.png", "verified_fraction",
                                  "share of points verified by the bank"),
        "tokens": plot_tradeoff(summary, report_dir / "accuracy_vs_tokens.png", "tokens", "LLM tokens per "
                                                                                          "scan",
                                log_x=True),
        "roc": plot_roc(curves, meta["classes"], report_dir / "roc.png"),
        "per_class": plot_per_class(summary, meta["classes"], report_dir / "per_class.png"),
    }
    example_list = render_examples(out, meta, report_dir / "examples", examples)
    write_html(out, summary, meta, {k: v.relative_to(out).as_posix() for k, v in plots.items()}, example_list)
    return _json_safe(summary)
