"""A study for issue 12: the detector's surface cues alone, and generic variants of them, after registration.

Why this exists: the fitted class fuses two per-point cues with its banks (detector.surface_cues): the
point-to-plane distance to the registered templates and the uncovered template rim. Their parameters are
generic (neighbour counts, a rim width in units of the local sampling spacing), never per class; this script
measures what each choice does on a dataset in the Anomaly-ShapeNet layout, calibrated leave-one-template-out
on the normal templates only, exactly as the fit does (:meth:`SurfaceCues.fit`). Variants: the smoothing
neighbourhood, the rim width, and sum vs max of the two cues. Registered test scans are cached (``--cache``),
so a rerun measures variants without registering again.

    python benchmarks/study_surface_cues.py dev-bench [--classes a,b] [--out cues.json] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import detector.surface_cues as sc
from detector.grouping import estimate_scale
from detector.registration import COORD_VOXEL_SHARE, align
from evals.metrics import au_pro_points, o_auroc, p_auroc
from scans.datasets import AnomalyShapeNet
from scans.geometry import voxel_downsample

# (name, smoothing neighbours, rim width in local spacings)
VARIANTS = (
    ("k10-rim2", 10, 2.0),
    ("k5-rim2", 5, 2.0),
    ("k1-rim2", 1, 2.0),
    ("k5-rim4", 5, 4.0),
)


def registered_class(dataset: AnomalyShapeNet, cls: str, cache: Path | None) -> dict:
    """Templates and test scans aligned onto the first template (cached as npz), with labels."""
    path = None if cache is None else cache / f"{cls}.npz"
    tests = dataset.test(cls)
    if path is not None and path.is_file():
        data = np.load(path, allow_pickle=False)
        n_t = int(data["n_templates"])
        return {
            "templates": [data[f"t{i}"] for i in range(n_t)],
            "tests": [data[f"s{i}"] for i in range(len(tests))],
            "masks": [data[f"m{i}"] for i in range(len(tests))],
            "labels": list(data["labels"]),
            "defects": [s.defect_type for s in tests],
        }
    scans = [sample.load().points for sample in dataset.train(cls)]
    scale = estimate_scale(scans)
    reference = scans[0][voxel_downsample(scans[0], COORD_VOXEL_SHARE * scale)].astype(np.float32)
    templates = [scans[0]] + [align(s, reference, scale).apply(s) for s in scans[1:]]
    out: dict = {"templates": templates, "tests": [], "masks": [], "labels": [], "defects": []}
    for sample in tests:
        loaded = sample.load()
        out["tests"].append(align(loaded.points, reference, scale).apply(loaded.points))
        out["masks"].append(loaded.mask if loaded.mask is not None else np.zeros(len(loaded.points), bool))
        out["labels"].append(int(loaded.object_label))
        out["defects"].append(sample.defect_type)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"t{i}": t for i, t in enumerate(templates)}
        arrays |= {f"s{i}": s for i, s in enumerate(out["tests"])}
        arrays |= {f"m{i}": m for i, m in enumerate(out["masks"])}
        np.savez(path, n_templates=len(templates), labels=np.asarray(out["labels"]), **arrays)
    return out


def variant_maps(data: dict, smooth_k: int, rim: float) -> dict[str, list[np.ndarray]]:
    """Per test scan: each cue in normal units (calibrated as the fit does), their sum and their max."""
    cues, _ = sc.SurfaceCues.fit(data["templates"], smooth_k, rim)
    out: dict[str, list[np.ndarray]] = {"surface": [], "rim": [], "sum": [], "max": []}
    for points in data["tests"]:
        raw = sc.raw_cues(
            points,
            cues.points,
            cues.tree(),
            cues.normals,
            cues.spacing,
            cues.reach,
            smooth_k=smooth_k,
            rim_spacings=rim,
        )
        unit = cues.normalised(raw)
        out["surface"].append(unit["surface_distance"])
        out["rim"].append(unit["uncovered_rim"])
        out["sum"].append(unit["surface_distance"] + unit["uncovered_rim"])
        out["max"].append(np.maximum(unit["surface_distance"], unit["uncovered_rim"]))
    return out


def measure(data: dict, maps: list[np.ndarray]) -> dict[str, float]:
    objects = [float(m.max()) for m in maps]
    labels = data["labels"]
    out = {
        "O-AUROC": o_auroc(objects, labels),
        "P-AUROC": p_auroc(maps, data["masks"]),
        "AU-PRO@0.3": au_pro_points(data["tests"], maps, data["masks"]),
    }
    normal = [o for o, label in zip(objects, labels) if label == 0]
    for defect in sorted({d for d, label in zip(data["defects"], labels) if label == 1}):
        found = [o for o, d in zip(objects, data["defects"]) if d == defect]
        out[defect] = o_auroc(normal + found, [0] * len(normal) + [1] * len(found))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "root", help="dataset root in the Anomaly-ShapeNet layout (e.g. from python -m evals.bench)"
    )
    parser.add_argument("--classes", default="", help="comma-separated classes (default: all)")
    parser.add_argument("--out", default="surface_cues.json")
    parser.add_argument("--cache", type=Path, help="folder for the registered scans (reused when present)")
    args = parser.parse_args()
    dataset = AnomalyShapeNet(args.root)
    classes = [c for c in args.classes.split(",") if c] or dataset.classes()
    results: dict[str, dict] = {}
    for cls in classes:
        started = time.perf_counter()
        data = registered_class(dataset, cls, args.cache)
        results[cls] = {}
        for name, smooth_k, rim in VARIANTS:
            maps = variant_maps(data, smooth_k, rim)
            for fusion, values in maps.items():
                results[cls][f"{name}-{fusion}"] = measure(data, values)
        print(f"{cls:12s} {time.perf_counter() - started:6.0f} s", flush=True)
        for key, found in results[cls].items():
            print(f"  {key:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True)
    keys = list(results[classes[0]])
    means = {
        key: {
            metric: float(np.nanmean([results[c][key][metric] for c in classes if metric in results[c][key]]))
            for metric in results[classes[0]][key]
        }
        for key in keys
    }
    for key in keys:
        print(f"mean {key:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in means[key].items()))
    Path(args.out).write_text(json.dumps({"classes": results, "means": means}, indent=1))


if __name__ == "__main__":
    main()
