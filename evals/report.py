"""What a harness run means, for people: summary.json/csv, a README-ready markdown table, plots and one HTML page.

Everything here is computed from the run's folder alone (``run.json``, ``results.jsonl``, the score files and the
dataset's ground truth), so a report can be rebuilt at any time (``write_all(out)``) and a partial run reports what
it has. Metrics are computed over the scans whose row is ``ok``; failed scans are counted and their reasons listed,
never scored as if they had an answer.

``summary.json`` is ``{name: {class: {...}, "mean": {...}}}``. A class entry holds o_auroc, p_auroc, au_pro (points,
FPR 0.3), fit_s, score_s (mean seconds per scan, the shared backbone pass included), verified_fraction, and for
backends region_recall (share of ground-truth regions named, pooled over scans), false_region_rate (share of named
regions without a defective point), tokens, tool calls, wall-time p50/p95, failures, fallbacks with their reasons and
cost; ``per_defect`` holds each defect type's o_auroc (that type vs the normal scans) and region recall. ``mean``
averages rates over classes (ignoring undefined ones) and sums counts (n_scans, n_failed, n_fallbacks, cost_total).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from evals.harness import FIT_META, METHOD_FEATURE, RUN_FILE, ResultStore
from evals.metrics import au_pro_points, mean_table, o_auroc, p_auroc
from scans import strict_json
from scans.datasets import Sample, open_dataset

REPORT_DIR = "report"
ROC_POINTS = 200             # points kept per plotted ROC curve
MAX_ROC_CLASSES = 4
SCALAR_COLUMNS = ("o_auroc", "p_auroc", "au_pro", "false_alarm_rate", "detection_rate", "region_recall",
                  "false_region_rate", "verified_fraction",
                  "prompt_tokens", "completion_tokens", "tokens", "tool_calls", "wall_p50", "wall_p95", "fit_s",
                  "score_s", "n_scans", "n_failed", "n_fallbacks", "cost_per_scan", "cost_total")
COUNT_KEYS = ("n_scans", "n_failed", "n_fallbacks", "cost_total")
ProgressFn = Callable[[str, int, int, str], None]


# ------------------------------------------------------------------------------------------------------ summary
def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else math.nan


def _pooled_rate(numerators: list[int | None], denominators: list[int | None]) -> float:
    pairs = [(a, b) for a, b in zip(numerators, denominators) if a is not None and b]
    total = sum(b for _, b in pairs)
    return sum(a for a, _ in pairs) / total if total else math.nan


def _cost(row: dict, prices: dict) -> float | None:
    if prices.get("prompt") is None and prices.get("completion") is None:
        return None
    return (row.get("prompt_tokens", 0) / 1000.0 * (prices.get("prompt") or 0.0)
            + row.get("completion_tokens", 0) / 1000.0 * (prices.get("completion") or 0.0))


def _roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[float]] | None:
    from sklearn.metrics import roc_curve

    if labels.size == 0 or labels.min() == labels.max():
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    if len(fpr) > ROC_POINTS:
        keep = np.unique(np.linspace(0, len(fpr) - 1, ROC_POINTS).astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return [round(float(x), 5) for x in fpr], [round(float(y), 5) for y in tpr]


class _Scans:
    """Loads each test scan (points, ground truth) once per class, whatever number of names use it."""

    def __init__(self, data: str, cls: str):
        self.samples: dict[str, Sample] = {str(s.path): s for s in open_dataset(data).test(cls)}
        self.cache: dict[str, tuple[np.ndarray, np.ndarray | None, int]] = {}

    def get(self, path: str) -> tuple[np.ndarray, np.ndarray | None, int]:
        if path not in self.cache:
            loaded = self.samples[path].load()
            label = int(loaded.object_label)
            mask = loaded.mask if loaded.mask is not None or label != 0 else np.zeros(len(loaded.points), bool)
            self.cache[path] = (loaded.points, mask, label)
        return self.cache[path]


def _class_entry(name: str, kind: str, rows: list[dict], scans: _Scans, out: Path, fit_s: float | None,
                 prices: dict) -> tuple[dict, dict]:
    """Metrics of one (name, class) and its ROC curves."""
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    entry: dict[str, Any] = {"n_scans": len(ok), "n_failed": len(failed), "fit_s": fit_s}
    obj_scores, obj_labels, types = [], [], []
    pts, pscores, masks = [], [], []
    for row in ok:
        points, mask, label = scans.get(row["path"])
        scores = np.load(out / row["scores"], allow_pickle=False)
        if label >= 0:
            obj_scores.append(float(row["object_score"]))
            obj_labels.append(label)
            types.append(row.get("defect_type", "unknown"))
        if mask is not None:
            pts.append(points)
            pscores.append(scores)
            masks.append(mask)
    labels = np.asarray(obj_labels, dtype=int)
    entry["false_alarm_rate"], entry["detection_rate"] = _verdict_rates(ok, scans)
    entry["o_auroc"] = o_auroc(obj_scores, labels) if obj_scores else math.nan
    entry["p_auroc"] = p_auroc(pscores, masks) if pscores else math.nan
    entry["au_pro"] = au_pro_points(pts, pscores, masks, 0.3) if pscores else math.nan
    entry["score_s"] = float(np.mean([r["seconds"] for r in ok])) if ok else math.nan
    walls = [r["seconds"] for r in rows if "seconds" in r]
    entry["wall_p50"], entry["wall_p95"] = _quantile(walls, 0.5), _quantile(walls, 0.95)
    entry["verified_fraction"] = float(np.mean([r.get("verified_fraction", 0.0) for r in ok])) if ok else math.nan
    curves = {"object": _roc_points(np.asarray(obj_scores), labels)}
    if pscores:
        pooled = np.concatenate(pscores)
        pooled_mask = np.concatenate(masks).astype(int)
        curves["point"] = _roc_points(pooled, pooled_mask)

    per_defect: dict[str, dict] = {}
    normal_scores = [s for s, lab in zip(obj_scores, obj_labels) if lab == 0]
    for kind_name in sorted({t for t, lab in zip(types, obj_labels) if lab == 1}):
        these = [s for s, t, lab in zip(obj_scores, types, obj_labels) if lab == 1 and t == kind_name]
        per_defect[kind_name] = {"n": len(these),
                                 "o_auroc": o_auroc(these + normal_scores, [1] * len(these) + [0] * len(normal_scores))}

    if kind == "backend":
        entry["region_recall"] = _pooled_rate([r.get("n_gt_regions_found") for r in ok],
                                              [r.get("n_gt_regions") for r in ok])
        entry["false_region_rate"] = _pooled_rate([r.get("n_false_regions") for r in ok],
                                                  [r.get("n_flagged_regions") for r in ok])
        for kind_name, stats in per_defect.items():
            these = [r for r in ok if r.get("defect_type") == kind_name and r.get("label") == 1]
            stats["region_recall"] = _pooled_rate([r.get("n_gt_regions_found") for r in these],
                                                  [r.get("n_gt_regions") for r in these])
        answered = [r for r in rows if "prompt_tokens" in r]  # failed rows may carry usage too
        for key in ("prompt_tokens", "completion_tokens", "tool_calls"):
            entry[key] = float(np.mean([r[key] for r in answered])) if answered else math.nan
        entry["tokens"] = entry["prompt_tokens"] + entry["completion_tokens"] if answered else math.nan
        entry["n_fallbacks"] = sum(bool(r.get("fallback_used")) for r in rows)
        entry["fallback_reasons"] = dict(Counter(r["fallback_reason"] for r in rows if r.get("fallback_used")))
        costs = [c for c in (_cost(r, prices) for r in answered) if c is not None]
        if costs:
            entry["cost_total"] = float(sum(costs))
            entry["cost_per_scan"] = float(np.mean(costs))
    else:
        entry.update(tokens=0.0, tool_calls=0.0)
    entry["failure_reasons"] = dict(Counter(r.get("reason") or "unknown" for r in failed))
    entry["per_defect"] = per_defect
    return entry, curves


def _verdict_rates(ok: list[dict], scans: _Scans) -> tuple[float, float]:
    """(share of normal scans called defective, share of defective scans called defective) by the calibrated object
    threshold; NaN where no scan of that kind has a verdict (methods without a threshold, uncalibrated fits)."""
    called = {0: [], 1: []}
    for row in ok:
        if row.get("verdict") in ("defective", "normal"):
            label = scans.get(row["path"])[2]
            if label in called:
                called[label].append(row["verdict"] == "defective")
    return tuple(float(np.mean(v)) if v else math.nan for v in (called[0], called[1]))  # type: ignore[return-value]


def _mean_entry(per_class: dict[str, dict]) -> dict:
    scalars = {cls: {k: v for k, v in e.items() if isinstance(v, (int, float)) and v is not None
                     and k not in COUNT_KEYS} for cls, e in per_class.items()}
    mean: dict[str, Any] = mean_table(scalars) if scalars else {}
    for key in COUNT_KEYS:
        values = [e[key] for e in per_class.values() if e.get(key) is not None]
        if values:
            mean[key] = sum(values)
    if "cost_total" in mean and mean.get("n_scans"):
        mean["cost_per_scan"] = mean["cost_total"] / max(mean["n_scans"] + mean.get("n_failed", 0), 1)
    for key in ("failure_reasons", "fallback_reasons"):
        merged: Counter = Counter()
        for e in per_class.values():
            merged.update(e.get(key, {}))
        if merged or any(key in e for e in per_class.values()):
            mean[key] = dict(merged)
    types = sorted({t for e in per_class.values() for t in e.get("per_defect", {})})
    mean["per_defect"] = {t: mean_table({c: {k: v for k, v in e["per_defect"][t].items() if k != "n"}
                                         for c, e in per_class.items() if t in e.get("per_defect", {})})
                          for t in types}
    return mean


def summarize(out: str | os.PathLike, progress: ProgressFn | None = None) -> tuple[dict, dict, dict]:
    """(summary, roc curves {name: {class: {...}}}, run meta) of the run in `out`."""
    out = Path(out)
    meta = json.loads((out / RUN_FILE).read_text())
    latest = ResultStore(out).latest()
    kinds = {m: "method" for m in meta["methods"]} | {b["label"]: "backend" for b in meta["backends"]}
    summary: dict[str, dict] = {name: {} for name in meta["names"]}
    curves: dict[str, dict] = {name: {} for name in meta["names"]}
    prices = meta.get("prices_per_1k", {})
    for index, cls in enumerate(meta["classes"]):
        if progress is not None:
            progress("report", index, len(meta["classes"]), cls)
        scans = _Scans(meta["data"], cls)
        wanted = meta["tests"][cls]["scans"]
        for name in meta["names"]:
            rows = [latest[(name, cls, scan)] for scan in wanted if (name, cls, scan) in latest]
            if not rows:
                continue
            feature = METHOD_FEATURE.get(name, "pointmae")
            fit = meta["fits"].get(cls, {}).get(feature) if feature else None
            entry, curve = _class_entry(name, kinds[name], rows, scans, out, _fit_seconds(fit), prices)
            summary[name][cls] = entry
            curves[name][cls] = curve
    for per_class in summary.values():
        per_class["mean"] = _mean_entry(dict(per_class)) if per_class else {}
    return summary, curves, meta


def _fit_seconds(fit: dict | None) -> float | None:
    if not fit:
        return None
    if fit.get("fit_s") is not None:
        return float(fit["fit_s"])
    meta_path = Path(fit["dir"]) / FIT_META
    if meta_path.is_file():
        value = json.loads(meta_path.read_text()).get("info", {}).get("fit_s")
        return None if value is None else float(value)
    return None


# ------------------------------------------------------------------------------------------------------ tables
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
    ("s/scan p50", "wall_p50", 2), ("s/scan p95", "wall_p95", 2), ("s/scan", "score_s", 2), ("fit s", "fit_s", 0),
    ("failed", "n_failed", 0), ("fallbacks", "n_fallbacks", 0),
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
            f"(at most {meta['limit']} per class, defective and normal alternating) — for every method and backend.")


def budget_note(meta: dict) -> str | None:
    """What each backend's run was allowed to spend per scan (None when no backend ran): the cost columns' ceiling."""
    if not meta.get("backends"):
        return None
    inspection = meta.get("inspection") or {}
    budget = inspection.get("budget") or {}
    parts = [f"at most {budget[k]:,} {what}" for k, what in (("max_turns", "turns"), ("max_tool_calls", "tool calls"),
                                                             ("max_total_tokens", "tokens")) if budget.get(k)]
    if budget.get("max_context_tokens"):
        parts.append(f"a context window of {budget['max_context_tokens']:,} tokens (the agent is asked to report "
                     "before a request would not fit)")
    if inspection.get("max_verify_fraction"):
        parts.append(f"the bank scores at most {inspection['max_verify_fraction']:.0%} of the points")
    return "Agent budget per scan: " + ", ".join(parts) + "." if parts else None


def grouped_reasons(summary: dict, limit: int | None = 4) -> list[tuple[str, str, str, int]]:
    """(method/backend, "failed" | "fell back", reason, count), most frequent first, at most `limit` per kind; numbers
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
    return [f"- {name} {what} x{count}: {reason}" for name, what, reason, count in grouped_reasons(summary, limit)]


def markdown_report(summary: dict, meta: dict) -> str:
    """The README-ready table (means over classes) plus per-class O-AUROC and per-defect-type tables."""
    columns = _columns(summary)
    lines = [f"Dataset `{meta['data']}`, classes: {', '.join(meta['classes'])}. {limit_note(meta)}",
             ("Means over classes; AUROC/AU-PRO over the scans that succeeded (failures are counted, not scored); "
              "share verified = points the memory bank scored; seconds include the shared Point-MAE pass."), "",
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
    """Mean O-AUROC and P-AUROC of each method/backend against its cost (share verified or tokens per scan)."""
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
            figure.legend(handles, labels, fontsize=8, ncol=min(len(names), 5), loc="upper center", frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------------ html
def render_examples(out: Path, meta: dict, directory: Path, max_examples: int = 4) -> list[dict]:
    """Ground truth and flagged regions of a few defective scans (one per class first), for the first backend."""
    from scans.render import render_points_png, render_regions_png

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


HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scanagent eval: {{ data }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #ddd; margin: 4px 0; }
.note { color: #555; font-size: 14px; }
.example { display: flex; gap: 8px; flex-wrap: wrap; }
.example img { width: 48%; }
code { background: #f4f4f4; padding: 1px 4px; }
</style></head><body>
<h1>Anomaly detection eval</h1>
<p class="note">Dataset <code>{{ data }}</code>; classes: {{ classes|join(', ') }}. {{ limit }}</p>
{% if command %}<p class="note">Command: <code>{{ command }}</code></p>{% endif %}
<h2>Summary (means over classes)</h2>
{{ main_table|safe }}
<p class="note">AUROC / AU-PRO are computed over the scans that succeeded; failures are counted. "share verified" is the
share of points the memory bank scored; seconds include the Point-MAE pass shared by the bank, recon and every backend.</p>
{% if budget %}<p class="note">{{ budget }}</p>{% endif %}
{% if failures %}<h3>Failures and fallbacks</h3><ul>
{% for item in failures %}<li><b>{{ item.name }}</b> {{ item.what }} ×{{ item.count }}: {{ item.reason }}</li>{% endfor %}
</ul>{% endif %}
<h2>Accuracy vs cost</h2>
<img src="{{ plots.verified }}" alt="accuracy vs share of points verified">
<img src="{{ plots.tokens }}" alt="accuracy vs tokens per scan">
<h2>Per class</h2>
{{ class_table|safe }}
<img src="{{ plots.per_class }}" alt="per-class bars">
<h2>ROC curves</h2>
<img src="{{ plots.roc }}" alt="ROC curves">
{% if defect_table %}<h2>Per defect type</h2><p class="note">O-AUROC of each defect type against the normal scans
(region recall of backends in brackets).</p>{{ defect_table|safe }}{% endif %}
{% if examples %}<h2>Example scans</h2>
{% for ex in examples %}<h3>{{ ex.class }}/{{ ex.scan }} ({{ ex.defect_type }}) — {{ ex.name }},
object score {{ '%.4g'|format(ex.object_score) }}</h3>
<div class="example"><img src="{{ ex.truth }}" alt="ground truth"><img src="{{ ex.flagged }}" alt="flagged"></div>
{% if ex.regions %}<ol>{% for r in ex.regions %}<li>{{ r.verdict }} (confidence {{ '%.2f'|format(r.confidence) }},
{{ r.n_points }} points): {{ r.reason }}</li>{% endfor %}</ol>{% endif %}
{% endfor %}{% endif %}
</body></html>
"""


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
    page = environment.from_string(HTML_TEMPLATE).render(
        data=meta["data"], classes=classes, limit=limit_note(meta), command=meta.get("command"), budget=budget_note(meta),
        main_table=_html_table([(n, e.get("mean", {})) for n, e in summary.items()], _columns(summary),
                               "method / backend"),
        class_table=_html_table([(n, {c: _pair(e.get(c)) for c in classes}) for n, e in summary.items()],
                                [(f"{c} (O / P)", c, -1) for c in classes], "method / backend"),
        defect_table=_html_table([(n, {t: _pair_defect(e.get("mean", {}).get("per_defect", {}).get(t))
                                       for t in types}) for n, e in summary.items()],
                                 [(t, t, -1) for t in types], "method / backend") if types else "",
        failures=failures[:30], plots=plots, examples=examples)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ all of it
def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_all(out: str | os.PathLike, *, progress: ProgressFn | None = None, examples: int = 4) -> dict:
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
        "tokens": plot_tradeoff(summary, report_dir / "accuracy_vs_tokens.png", "tokens", "LLM tokens per scan",
                                log_x=True),
        "roc": plot_roc(curves, meta["classes"], report_dir / "roc.png"),
        "per_class": plot_per_class(summary, meta["classes"], report_dir / "per_class.png"),
    }
    example_list = render_examples(out, meta, report_dir / "examples", examples)
    write_html(out, summary, meta, {k: v.relative_to(out).as_posix() for k, v in plots.items()}, example_list)
    return _json_safe(summary)
