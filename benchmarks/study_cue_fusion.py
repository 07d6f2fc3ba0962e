"""A study for issue 12 item 3: does fusing the surface cues with a feature bank help point-level accuracy?

Why this exists: the cues alone clear the object bars but not P-AUROC / AU-PRO; the fitted class adds
them per point to the bank's score. This script fits the FPFH bank (no training, so it runs on a loaded
machine) on the registered templates that ``study_surface_cues.py --cache`` saved, with the cues on
(identity alignment: the scans are already in the reference frame), and scores each cached test scan four
ways: the bank alone (in its normal unit), the cues alone, the fitted class's fusion (bank + cues per
point; object = the larger of the bank's and the largest fused point score), and max instead of sum.

    python benchmarks/study_cue_fusion.py CACHE_DIR --classes a,b [--out fusion.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from detector.config import DetectorConfig
from detector.fitting import fit_class
from evals.metrics import au_pro_points, o_auroc, p_auroc


def measure(tests: list[np.ndarray], masks: list[np.ndarray], labels: list[int], maps, objects) -> dict:
    return {
        "O-AUROC": o_auroc(objects, labels),
        "P-AUROC": p_auroc(maps, masks),
        "AU-PRO@0.3": au_pro_points(tests, maps, masks),
    }


def study_class(path: Path) -> dict[str, dict]:
    data = np.load(path, allow_pickle=False)
    templates = [data[f"t{i}"] for i in range(int(data["n_templates"]))]
    labels = [int(v) for v in data["labels"]]
    tests = [data[f"s{i}"] for i in range(len(labels))]
    masks = [data[f"m{i}"] for i in range(len(labels))]
    fitted = fit_class(templates, replace(DetectorConfig(feature="fpfh"), register=False))
    rows: dict[str, tuple[list, list]] = {k: ([], []) for k in ("bank", "cues", "sum", "max")}
    for points in tests:
        analysis = fitted.analyse(points)
        fused = fitted.score(analysis)
        cue = analysis.cue_total[fused.point_ids]
        bank = fused.point_scores - cue
        bank_obj = float(
            fitted.bank.object_score(
                analysis.patches.features, fused.patch_scores, fitted.bank.score(analysis.patches.features)[1]
            )
        )
        for name, values, obj in (
            ("bank", bank, bank_obj),
            ("cues", cue, float(cue.max())),
            ("sum", fused.point_scores, fused.object_score),
            ("max", np.maximum(bank, cue), max(bank_obj, float(cue.max()))),
        ):
            rows[name][0].append(values)
            rows[name][1].append(obj)
    out = {name: measure(tests, masks, labels, maps, objs) for name, (maps, objs) in rows.items()}
    # the verdict of the fused object score: the lean-corrected threshold and the uncorrected one
    corrected = fitted.thresholds["object_threshold"]
    lean = fitted.thresholds["object_loo_lean"]
    scores, defective = np.asarray(rows["sum"][1]), np.asarray(labels) == 1
    for name, threshold in (("corrected", corrected), ("uncorrected", corrected * lean)):
        out[f"verdict-{name}"] = {
            "threshold": threshold,
            "false alarms": int((scores[~defective] > threshold).sum()),
            "normal": int((~defective).sum()),
            "detected": int((scores[defective] > threshold).sum()),
            "defective": int(defective.sum()),
        }
    out["lean"] = {"lean": lean}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, help="the --cache folder of study_surface_cues.py")
    parser.add_argument("--classes", required=True)
    parser.add_argument("--out", default="cue_fusion.json")
    args = parser.parse_args()
    results = {}
    for cls in args.classes.split(","):
        results[cls] = study_class(args.cache / f"{cls}.npz")
        for name, found in results[cls].items():
            print(f"{cls:10s} {name:5s} " + "  ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True)
        print(json.dumps({k: v for k, v in results[cls].items() if k not in ("bank", "cues", "sum", "max")}))
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
