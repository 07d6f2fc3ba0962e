"""Region recall against the share of points verified, one line per reader over its operating points.

    python benchmarks/plot_share.py share.png RUN/summary.json [RUN2/summary.json ...] \
        --series "policy=policy,policy-s0.05,policy-s0.08" --series "hf=hf,hf-t-1.5" [--out-json share.json]

Why: a reader that names more patches finds more defects and has the bank verify more points, so two readers'
recall is only comparable at the same verified share (issue 13's bar). Each reader is run at several operating
points (the policy's `target_share`, the ranker's `threshold`, a rows adapter's `row_threshold`; one
`evals.run` row each, on the same fits), and this draws each reader's points as a line, prints them, and for
every point of every series gives the other series' recall at that share (linear between their points; "-"
outside their range, nothing is extrapolated).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from evals.report import _colours, _figure

COLUMNS = ("verified_fraction", "region_recall", "false_region_rate", "o_auroc", "p_auroc")


def read_rows(paths: list[Path]) -> dict[str, dict]:
    """Every backend row's means over all given summaries, by label (a later file's row wins)."""
    rows: dict[str, dict] = {}
    for path in paths:
        for label, entry in json.loads(path.read_text()).items():
            if isinstance(entry, dict) and entry.get("mean"):
                rows[label] = entry["mean"]
    return rows


def parse_series(texts: list[str], rows: dict[str, dict]) -> dict[str, list[tuple[str, dict]]]:
    """`name=label,label,...` -> that reader's points, sorted by verified share; a label not in the
    summaries is an error naming it."""
    series: dict[str, list[tuple[str, dict]]] = {}
    for text in texts:
        name, _, labels = text.partition("=")
        if not name or not labels:
            raise SystemExit(f"--series {text!r}: expected NAME=label,label,...")
        missing = [label for label in labels.split(",") if label not in rows]
        if missing:
            raise SystemExit(f"--series {name}: no row {', '.join(missing)} in the summaries")
        points = [(label, rows[label]) for label in labels.split(",")]
        series[name] = sorted(points, key=lambda p: p[1]["verified_fraction"])
    return series


def recall_at(points: list[tuple[str, dict]], share: float) -> float | None:
    """A reader's recall at `share`, linear between its two nearest points; None outside its range."""
    xs = [p["verified_fraction"] for _, p in points]
    ys = [p["region_recall"] for _, p in points]
    if not xs or share < xs[0] - 1e-9 or share > xs[-1] + 1e-9:
        return None
    return float(np.interp(share, xs, ys))


def table(series: dict[str, list[tuple[str, dict]]]) -> tuple[str, list[dict]]:
    names = list(series)
    head = ["reader", "row", *COLUMNS, *(f"{other} recall here" for other in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    records = []
    for name, points in series.items():
        for label, mean in points:
            others = {o: recall_at(series[o], mean["verified_fraction"]) for o in names}
            record = {"reader": name, "row": label, **{c: mean.get(c) for c in COLUMNS}, "others": others}
            records.append(record)
            cells = [f"{mean.get(c, float('nan')):.3f}" for c in COLUMNS]
            cells += ["-" if v is None else f"{v:.3f}" for v in others.values()]
            lines.append("| " + " | ".join([name, label, *cells]) + " |")
    return "\n".join(lines), records


def plot(series: dict[str, list[tuple[str, dict]]], out: Path) -> None:
    colours = _colours(list(series))
    figure = _figure(6.4, 4.4)
    axes = figure.add_subplot(1, 1, 1)
    for name, points in series.items():
        xs = [p["verified_fraction"] for _, p in points]
        ys = [p["region_recall"] for _, p in points]
        axes.plot(xs, ys, marker="o", color=colours[name], label=name)
    axes.set_xlabel("share of points verified by the bank")
    axes.set_ylabel("region recall (mean over classes)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center right")
    figure.tight_layout()
    figure.savefig(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("summaries", type=Path, nargs="+")
    p.add_argument("--series", action="append", required=True, help="NAME=label,label,... (repeatable)")
    p.add_argument("--out-json", type=Path, help="also write the points and cross-reads as JSON")
    args = p.parse_args(argv)
    series = parse_series(args.series, read_rows(args.summaries))
    text, records = table(series)
    print(text)
    plot(series, args.out)
    if args.out_json:
        args.out_json.write_text(json.dumps(records, indent=1) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
