"""What a harness run measured: the summary of every (name, class), computed from the run's folder alone.

Everything here is computed from the run's folder alone (``run.json``, ``results.jsonl``, the score files and
the
dataset's ground truth), so a report can be rebuilt at any time (``write_all(out)``) and a partial run reports
what
it has. Metrics are computed over the scans whose row is ``ok``; failed scans are counted and their reasons
listed,
never scored as if they had an answer.

``summary.json`` is ``{name: {class: {...}, "mean": {...}}}``. A class entry holds o_auroc, p_auroc, au_pro
(points,
FPR 0.3), fit_s, score_s (mean seconds per scan, the shared backbone pass included), verified_fraction, and
for
backends region_recall (share of ground-truth regions named, pooled over scans), false_region_rate (share of
named
regions without a defective point), tokens, tool calls, wall-time p50/p95, failures, fallbacks with their
reasons and
cost; ``per_defect`` holds each defect type's o_auroc (that type vs the normal scans) and region recall.
``mean``
averages rates over classes (ignoring undefined ones) and sums counts (n_scans, n_failed, n_fallbacks,
cost_total).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from evals.methods import REGISTRY as METHODS
from evals.metrics import au_pro_points, mean_table, o_auroc, p_auroc
from evals.store import FIT_META, RUN_FILE, ResultStore
from scans.datasets import Sample, open_dataset
from scans.progress import Progress

ROC_POINTS = 200  # points kept per plotted ROC curve
COUNT_KEYS = ("n_scans", "n_failed", "n_fallbacks", "cost_total")


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else math.nan


def _pooled_rate(numerators: list[int | None], denominators: list[int | None]) -> float:
    pairs = [(a, b) for a, b in zip(numerators, denominators) if a is not None and b]
    total = sum(b for _, b in pairs)
    return sum(a for a, _ in pairs) / total if total else math.nan


def _cost(row: dict, prices: dict) -> float | None:
    if prices.get("prompt") is None and prices.get("completion") is None:
        return None
    return row.get("prompt_tokens", 0) / 1000.0 * (prices.get("prompt") or 0.0) + row.get(
        "completion_tokens", 0
    ) / 1000.0 * (prices.get("completion") or 0.0)


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
            mask = (
                loaded.mask if loaded.mask is not None or label != 0 else np.zeros(len(loaded.points), bool)
            )
            self.cache[path] = (loaded.points, mask, label)
        return self.cache[path]


def _class_entry(
    name: str, kind: str, rows: list[dict], scans: _Scans, out: Path, fit_s: float | None, prices: dict
) -> tuple[dict, dict]:
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
    entry["o_auroc"] = o_auroc(obj_scores, labels) if obj_scores else math.nan
    entry["p_auroc"] = p_auroc(pscores, masks) if pscores else math.nan
    entry["au_pro"] = au_pro_points(pts, pscores, masks, 0.3) if pscores else math.nan
    entry["false_alarm_rate"], entry["detection_rate"] = _verdict_rates(ok, scans)
    entry["score_s"] = float(np.mean([r["seconds"] for r in ok])) if ok else math.nan
    walls = [r["seconds"] for r in rows if "seconds" in r]
    entry["wall_p50"], entry["wall_p95"] = _quantile(walls, 0.5), _quantile(walls, 0.95)
    entry["verified_fraction"] = (
        float(np.mean([r.get("verified_fraction", 0.0) for r in ok])) if ok else math.nan
    )
    curves = {"object": _roc_points(np.asarray(obj_scores), labels)}
    if pscores:
        pooled = np.concatenate(pscores)
        pooled_mask = np.concatenate(masks).astype(int)
        curves["point"] = _roc_points(pooled, pooled_mask)

    per_defect: dict[str, dict] = {}
    normal_scores = [s for s, lab in zip(obj_scores, obj_labels) if lab == 0]
    for kind_name in sorted({t for t, lab in zip(types, obj_labels) if lab == 1}):
        these = [s for s, t, lab in zip(obj_scores, types, obj_labels) if lab == 1 and t == kind_name]
        per_defect[kind_name] = {
            "n": len(these),
            "o_auroc": o_auroc(these + normal_scores, [1] * len(these) + [0] * len(normal_scores)),
        }

    if kind == "backend":
        entry["region_recall"] = _pooled_rate(
            [r.get("n_gt_regions_found") for r in ok], [r.get("n_gt_regions") for r in ok]
        )
        entry["false_region_rate"] = _pooled_rate(
            [r.get("n_false_regions") for r in ok], [r.get("n_flagged_regions") for r in ok]
        )
        for kind_name, stats in per_defect.items():
            these = [r for r in ok if r.get("defect_type") == kind_name and r.get("label") == 1]
            stats["region_recall"] = _pooled_rate(
                [r.get("n_gt_regions_found") for r in these], [r.get("n_gt_regions") for r in these]
            )
        answered = [r for r in rows if "prompt_tokens" in r]  # failed rows may carry usage too
        for key in ("prompt_tokens", "completion_tokens", "tool_calls"):
            entry[key] = float(np.mean([r[key] for r in answered])) if answered else math.nan
        entry["tokens"] = entry["prompt_tokens"] + entry["completion_tokens"] if answered else math.nan
        entry["n_fallbacks"] = sum(bool(r.get("fallback_used")) for r in rows)
        entry["fallback_reasons"] = dict(
            Counter(r["fallback_reason"] for r in rows if r.get("fallback_used"))
        )
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
    """(share of normal scans called defective, share of defective scans called defective) by the calibrated
    object
    threshold; NaN where no scan of that kind has a verdict (methods without a threshold, uncalibrated
    fits)."""
    called = {0: [], 1: []}
    for row in ok:
        if row.get("verdict") in ("defective", "normal"):
            label = scans.get(row["path"])[2]
            if label in called:
                called[label].append(row["verdict"] == "defective")
    return tuple(float(np.mean(v)) if v else math.nan for v in (called[0], called[1]))  # type: ignore[return-value]


def _mean_entry(per_class: dict[str, dict]) -> dict:
    scalars = {
        cls: {
            k: v
            for k, v in e.items()
            if isinstance(v, (int, float)) and v is not None and k not in COUNT_KEYS
        }
        for cls, e in per_class.items()
    }
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
    mean["per_defect"] = {
        t: mean_table(
            {
                c: {k: v for k, v in e["per_defect"][t].items() if k != "n"}
                for c, e in per_class.items()
                if t in e.get("per_defect", {})
            }
        )
        for t in types
    }
    return mean


def summarize(out: str | os.PathLike, progress: Progress | None = None) -> tuple[dict, dict, dict]:
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
            feature = (
                METHODS[name].feature if name in METHODS else "pointmae"
            )  # backends read the Point-MAE fit
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
