"""Bar chart of a harness run's backend rows: region recall, false-region rate, O-AUROC and P-AUROC.

    python benchmarks/plot_rows.py RUN/summary.json rows.png [--names "long label=short,..."]

Why: the harness's own scatter plots name each point by its label, and guided rows' labels (a backend spec
with its guidance text and file paths) are too long to read there; this names them as asked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evals.report import _figure

METRICS = (
    ("region_recall", "region recall"),
    ("false_region_rate", "false-region rate"),
    ("o_auroc", "O-AUROC"),
    ("p_auroc", "P-AUROC"),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("summary", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--names", default="", help="comma-separated label=short pairs (a label may hold '=')")
    args = p.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    short: dict[str, str] = {}
    for pair in filter(None, args.names.split(",")):
        label, _, name = pair.rpartition("=")
        short[label] = name
    rows = [(short.get(label, label), entry["mean"]) for label, entry in summary.items() if entry.get("mean")]
    figure = _figure(3.2 * len(METRICS), 3.6)
    for position, (key, title) in enumerate(METRICS, start=1):
        axes = figure.add_subplot(1, len(METRICS), position)
        values = [mean.get(key) or 0.0 for _, mean in rows]
        axes.barh(range(len(rows)), values, color="tab:blue")
        axes.set_yticks(range(len(rows)), [name for name, _ in rows] if position == 1 else [""] * len(rows))
        axes.invert_yaxis()
        axes.set_xlim(0, 1.05)
        axes.set_title(title, fontsize=9)
        axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
