"""What a dataset holds, class by class, and the `python -m evals.datasets <layout>:<root>` command that
prints it.

Every scan is read and its ground truth checked, so the summary doubles as a check of a downloaded benchmark:
the
problems it lists are the files a run would refuse.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scans import strict_json
from scans.datasets import LAYOUTS, Dataset, DatasetError, Problem, open_dataset
from scans.files import atomic_write_text
from scans.io import ScanError


@dataclass
class ClassSummary:
    cls: str
    n_train: int = 0
    n_validation: int = 0
    n_test: int = 0
    n_defective: int = 0
    n_unknown: int = 0
    points_per_sample: list[int] = field(default_factory=list)
    anomalous_shares: list[float] = field(default_factory=list)  # one per loaded defective test sample
    problems: list[Problem] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        counts = np.asarray(self.points_per_sample)
        points = (
            {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}
            if len(counts)
            else None
        )
        share = float(np.mean(self.anomalous_shares)) if self.anomalous_shares else None
        return {
            "class": self.cls,
            "train": self.n_train,
            "validation": self.n_validation,
            "test": self.n_test,
            "defective": self.n_defective,
            "unknown_label": self.n_unknown,
            "points": points,
            "anomalous_share_mean": share,
            "problems": len(self.problems),
        }


def summarize_class(dataset: Dataset, cls: str, **read_kwargs: Any) -> ClassSummary:
    """Load every sample of a class once; collect counts, point statistics and per-file problems (never raise
    for a broken file, so one bad scan does not hide the state of the rest of the tree)."""
    summary = ClassSummary(cls, problems=dataset.structure_problems(cls))
    train, validation, test = dataset.train(cls), dataset.validation(cls), dataset.test(cls)
    summary.n_train, summary.n_validation, summary.n_test = len(train), len(validation), len(test)
    for sample in train + validation + test:
        try:
            loaded = sample.load(**read_kwargs)
        except (ScanError, DatasetError) as exc:
            summary.problems.append(Problem(sample.path, str(exc)))
            label = sample.label
        else:
            summary.points_per_sample.append(len(loaded.points))
            label = loaded.object_label
            if sample.split == "test" and sample.label == 1 and loaded.mask is not None:
                if not loaded.mask.any():
                    summary.problems.append(
                        Problem(sample.path, "defective sample but its ground truth marks no anomalous point")
                    )
                summary.anomalous_shares.append(float(loaded.mask.mean()) if len(loaded.mask) else 0.0)
            elif sample.split == "test" and label == 1 and loaded.mask is not None:  # resolved on load
                summary.anomalous_shares.append(float(loaded.mask.mean()))
        if sample.split == "test":
            summary.n_defective += int(label == 1)
            summary.n_unknown += int(label == -1)
    return summary


def summarize(
    dataset: Dataset, classes: Sequence[str] | None = None, **read_kwargs: Any
) -> list[ClassSummary]:
    chosen = list(classes) if classes else dataset.classes()
    for cls in chosen:
        dataset.class_dir(cls)  # unknown class -> DatasetError before any loading
    return [summarize_class(dataset, cls, **read_kwargs) for cls in chosen]


def summary_document(spec: str, dataset: Dataset, summaries: Sequence[ClassSummary]) -> dict[str, Any]:
    return {
        "spec": spec,
        "layout": dataset.layout,
        "root": str(dataset.root),
        "classes": [s.as_dict() for s in summaries],
        "problems": [
            {"class": s.cls, "path": str(p.path), "message": p.message} for s in summaries for p in s.problems
        ],
    }


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write to a temp file next to ``path`` and rename, so a crash never leaves half a JSON file."""
    atomic_write_text(path, strict_json.dumps(document, what=str(path), indent=2) + "\n")


def _format_share(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def render_table(document: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{document['layout']}: {document['root']}")
    # Short headers and folding (not truncating) cells keep every number visible in an 80-column terminal.
    for name in ("class", "train", "val", "test", "defect", "unk.", "points min/med/max", "anom.", "probl."):
        table.add_column(name, justify="left" if name == "class" else "right", overflow="fold")
    for row in document["classes"]:
        points = row["points"]
        median = points and (
            f"{points['median']:.0f}" if float(points["median"]).is_integer() else f"{points['median']:.1f}"
        )
        points_text = "-" if points is None else f"{points['min']} / {median} / {points['max']}"
        table.add_row(
            row["class"],
            str(row["train"]),
            str(row["validation"]),
            str(row["test"]),
            str(row["defective"]),
            str(row["unknown_label"]),
            points_text,
            _format_share(row["anomalous_share_mean"]),
            str(row["problems"]),
        )
    return table


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Summarise a dataset tree; exit 0 clean, 1 problems found, 2 bad spec/root/class."""
    from rich.console import Console

    parser = argparse.ArgumentParser(
        prog="python -m evals.datasets",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  scanagent datasets anomaly-shapenet:dev-bench --classes flange,gear --json "
        "out.json\n"
        "  (`python -m evals.datasets ...` is the same command)\n\n"
        "exit codes: 0 clean, 1 problems found in the tree, 2 bad spec, root or class",
    )
    parser.add_argument("spec", help=f"<layout>:<root>, layout one of {', '.join(LAYOUTS)}")
    parser.add_argument("--classes", help="comma-separated classes (default: all)")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--remove-background", action="store_true", help="mvtec3d: drop the support plane")
    args = parser.parse_args(argv)

    console, errors = Console(), Console(stderr=True)
    options = {"remove_background": True} if args.remove_background else {}
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        dataset = open_dataset(args.spec, **options)
        summaries = summarize(dataset, classes)
    except DatasetError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    document = summary_document(args.spec, dataset, summaries)
    console.print(render_table(document))
    for problem in document["problems"]:
        text = problem["message"]
        if not text.startswith(problem["path"]):
            text = f"{problem['path']}: {text}"
        console.print(f"problem [{problem['class']}] {text}", markup=False, highlight=False)
    if args.json:
        write_json_atomic(args.json, document)
    return 1 if document["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
