"""Issue 12 item 3, the seed's thesis tested: do Point-MAE's features find what geometry alone does not?

Why this exists: every default fit scores a point as its feature bank's distance plus the surface cues
(point-to-plane distance to the registered templates, uncovered template rim), all in normal units. This
study takes the fits an `evals.run` with `--methods pointmae-bank,btf` left in its output folder (nothing is
refitted or retrained) and scores every test scan of each class six ways from the same analyses:

* `cues`: the surface cues alone (object score: the largest point score);
* `fpfh`, `pointmae`: a feature bank alone (with the registered-coordinate bank when the fit registered);
* `fpfh+cues`, `pointmae+cues`: what `evals.run`'s `btf` and `pointmae-bank` rows score (the fitted class);
* `all`: both banks and the cues summed per point, the object score the largest of the parts'.

Each row's object score is reported two ways: the fitted class's (the larger of the bank's PatchCore object
score and the largest fused point score) and `points-only` (the largest fused point score): the second says
whether the bank's object score helps or hides the cues.

    python benchmarks/study_ablation.py --data anomaly-shapenet:dev-bench --fits results-dev \
        [--classes a,b] [--out ablation.json] [--markdown ablation.md]

Output: per class and per defect type (each type's O-AUROC against the class's normal scans), and means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from detector.fitted import FittedClass
from evals.metrics import au_pro_points, o_auroc, p_auroc
from scans.datasets import open_dataset

ROWS = ("cues", "fpfh", "pointmae", "fpfh+cues", "pointmae+cues", "all")
OBJECT_RULES = ("fitted", "points-only")


def find_fit(fits: Path, cls: str, feature: str) -> Path:
    """The one `<feature>-<hash>` fit of `cls` in an evals.run output folder (an error if none or several)."""
    found = sorted(p for p in (fits / "fits" / cls).glob(f"{feature}-*") if (p / "fitted.json").is_file())
    if len(found) != 1:
        raise SystemExit(f"{fits}: expected one finished {feature} fit of {cls!r}, found {len(found)}")
    return found[0]


def bank_parts(fitted: FittedClass, points: np.ndarray) -> tuple[np.ndarray, float, np.ndarray | None]:
    """(bank point scores, bank object score, cue point scores or None) of one scan, all points in order."""
    analysis = fitted.analyse(points)
    full = fitted.score(analysis)
    cue = None if analysis.cue_total is None else analysis.cue_total[full.point_ids].astype(np.float64)
    bank = full.point_scores.astype(np.float64) - (0.0 if cue is None else cue)
    all_patches = np.arange(analysis.n_patches, dtype=np.int64)
    dist, nn_idx = fitted.patch_distances(analysis, all_patches)
    bank_obj = float(fitted.bank.object_score(analysis.patches.features, dist, nn_idx))
    order = np.argsort(full.point_ids)
    return bank[order], bank_obj, None if cue is None else cue[order]


def scan_rows(pm: FittedClass, fp: FittedClass, points: np.ndarray) -> dict[str, tuple[np.ndarray, dict]]:
    """Every row's per-point map and object scores (both rules) for one scan."""
    pm_bank, pm_obj, pm_cue = bank_parts(pm, points)
    fp_bank, fp_obj, fp_cue = bank_parts(fp, points)
    cue = pm_cue if pm_cue is not None else fp_cue
    if cue is None:
        raise SystemExit("these fits have no surface cues (fits with fewer than two templates)")
    out: dict[str, tuple[np.ndarray, dict]] = {}
    for name, point_map, bank_objects in (
        ("cues", cue, []),
        ("fpfh", fp_bank, [fp_obj]),
        ("pointmae", pm_bank, [pm_obj]),
        ("fpfh+cues", fp_bank + cue, [fp_obj]),
        ("pointmae+cues", pm_bank + cue, [pm_obj]),
        ("all", pm_bank + fp_bank + cue, [pm_obj, fp_obj]),
    ):
        top = float(point_map.max())
        with_bank = max([top, *bank_objects]) if "cues" in name or name == "all" else max(bank_objects)
        out[name] = (point_map, {"fitted": with_bank, "points-only": top})
    return out


def measure(points, maps, masks, objects, labels, types) -> dict:
    """O/P-AUROC and AU-PRO of one row on one class, plus each defect type's O-AUROC (per object rule)."""
    result: dict = {"P-AUROC": p_auroc(maps, masks), "AU-PRO@0.3": au_pro_points(points, maps, masks)}
    normal = [i for i, t in enumerate(types) if t == "good"]
    for kind in sorted({t for t in types if t != "good"}):  # point-level, each type's scans + the normal ones
        picked = normal + [i for i, t in enumerate(types) if t == kind]
        result.setdefault("types P-AUROC", {})[kind] = p_auroc(
            [maps[i] for i in picked], [masks[i] for i in picked]
        )
        result.setdefault("types AU-PRO", {})[kind] = au_pro_points(
            [points[i] for i in picked], [maps[i] for i in picked], [masks[i] for i in picked]
        )
    for rule in OBJECT_RULES:
        scores = [o[rule] for o in objects]
        result[f"O-AUROC {rule}"] = o_auroc(scores, labels)
        for kind in sorted({t for t in types if t != "good"}):
            picked = normal + [i for i, t in enumerate(types) if t == kind]
            result.setdefault(f"types {rule}", {})[kind] = o_auroc(
                [scores[i] for i in picked], [labels[i] for i in picked]
            )
    return result


def study_class(dataset, fits: Path, cls: str) -> dict:
    pm = FittedClass.load(find_fit(fits, cls, "pointmae"))
    fp = FittedClass.load(find_fit(fits, cls, "fpfh"))
    per_row: dict[str, dict[str, list]] = {r: {"maps": [], "objects": []} for r in ROWS}
    points, masks, labels, types = [], [], [], []
    for sample in dataset.test(cls):
        loaded = sample.load()
        points.append(loaded.points)
        masks.append(np.zeros(len(loaded.points), bool) if loaded.mask is None else loaded.mask)
        labels.append(loaded.object_label)
        types.append(sample.defect_type)
        for name, (point_map, objects) in scan_rows(pm, fp, loaded.points).items():
            per_row[name]["maps"].append(point_map)
            per_row[name]["objects"].append(objects)
    return {
        name: measure(points, got["maps"], masks, got["objects"], labels, types)
        for name, got in per_row.items()
    }


def means(results: dict[str, dict]) -> dict[str, dict]:
    """Per row: the mean over classes of each metric, and each defect type's O-AUROC pooled by mean."""
    out: dict[str, dict] = {}
    for row in ROWS:
        got = [results[c][row] for c in results]
        entry = {k: float(np.mean([g[k] for g in got])) for k in got[0] if not k.startswith("types")}
        for key in [f"types {rule}" for rule in OBJECT_RULES] + ["types P-AUROC", "types AU-PRO"]:
            kinds = sorted({k for g in got for k in g[key]})
            entry[key] = {k: float(np.mean([g[key][k] for g in got if k in g[key]])) for k in kinds}
        out[row] = entry
    return out


def markdown(results: dict[str, dict], mean: dict[str, dict]) -> str:
    lines = [
        "| row | O-AUROC (fitted object) | O-AUROC (points only) | P-AUROC | AU-PRO@0.3 |",
        "|:---|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        m = mean[row]
        lines.append(
            f"| {row} | {m['O-AUROC fitted']:.3f} | {m['O-AUROC points-only']:.3f} | {m['P-AUROC']:.3f} "
            f"| {m['AU-PRO@0.3']:.3f} |"
        )
    kinds = sorted(mean[ROWS[0]]["types fitted"])
    lines += ["", "Per defect type, O-AUROC (fitted object) / P-AUROC / AU-PRO:", ""]
    lines += ["| row | " + " | ".join(kinds) + " |", "|:---|" + "---:|" * len(kinds)]
    for row in ROWS:
        m = mean[row]
        cells = [
            f"{m['types fitted'][k]:.3f} / {m['types P-AUROC'][k]:.3f} / {m['types AU-PRO'][k]:.3f}"
            for k in kinds
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    classes = list(results)
    lines += [
        "",
        "Per class, O-AUROC (fitted) / P-AUROC / AU-PRO:",
        "",
        "| row | " + " | ".join(classes) + " |",
    ]
    lines.append("|:---|" + "---:|" * len(classes))
    for row in ROWS:
        cells = [
            f"{results[c][row]['O-AUROC fitted']:.3f} / {results[c][row]['P-AUROC']:.3f} / "
            f"{results[c][row]['AU-PRO@0.3']:.3f}"
            for c in classes
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="<layout>:<root>, as evals.run's --data")
    parser.add_argument("--fits", required=True, type=Path, help="an evals.run --out folder with both fits")
    parser.add_argument("--classes", default=None)
    parser.add_argument("--out", type=Path, default=Path("ablation.json"))
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    dataset = open_dataset(args.data)
    classes = args.classes.split(",") if args.classes else dataset.classes()
    results = {}
    for cls in classes:
        results[cls] = study_class(dataset, args.fits, cls)
        print(
            f"{cls:11s} "
            + "  ".join(f"{r} {v['O-AUROC fitted']:.2f}/{v['P-AUROC']:.3f}" for r, v in results[cls].items()),
            file=sys.stderr,
            flush=True,
        )
    mean = means(results)
    args.out.write_text(json.dumps({"classes": results, "mean": mean}, indent=1), encoding="utf-8")
    text = markdown(results, mean)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
