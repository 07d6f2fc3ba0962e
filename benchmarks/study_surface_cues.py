"""A study for issue 12, not the detector: how far do point-level geometric cues go once a scan is registered?

Why this exists: the registered detector's coordinate bank scores a *patch* by the mean distance of its
points to the nearest template sample, which blurs thin defects (scratches) into the sampling spacing and
cannot see missing material (holes, broken-off parts) at all. This script measures, on a dataset in the
Anomaly-ShapeNet layout, three per-point cues computed after the detector's own registration, each
calibrated leave-one-template-out on the normal templates only (no labels, no per-class setting):

* ``nn``: distance to the nearest registered template point (what the coordinate bank averages per patch);
* ``surf``: point-to-plane distance to the templates' surface (median over the 4 nearest template points of
  |n . (p - q)| with the templates' normals), which does not grow with the sampling spacing;
* ``cov``: coverage: template points farther from the scan than normal (the LOO 99.5th percentile) mark the
  scan points on their rim, scaled by how far beyond normal they are;

each smoothed over 10 scan neighbours and divided by its LOO 99th percentile, then ``fused`` (max) and
``summed``. It prints O-AUROC, P-AUROC, AU-PRO@0.3 and per-defect-type O-AUROC per class and their means,
and writes them as json.

    python benchmarks/study_surface_cues.py dev-bench [--classes a,b] [--out cues.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.spatial import cKDTree

from detector.pointmae import estimate_scale
from detector.registration import COORD_VOXEL_SHARE, align
from evals.metrics import au_pro_points, o_auroc, p_auroc
from scans.datasets import AnomalyShapeNet
from scans.geometry import estimate_normals, voxel_downsample

CUES = ("nn", "surf", "cov", "fused", "summed")
PLANE_NEIGHBOURS = 4
SMOOTH_NEIGHBOURS = 10


def surface_distances(
    points: np.ndarray, tree: cKDTree, normals: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(point-to-plane, nearest-point) distance of each point to the template union behind ``tree``."""
    dist, idx = tree.query(points, k=PLANE_NEIGHBOURS, workers=1)
    offsets = points[:, None, :] - tree.data[idx]
    plane = np.abs(np.einsum("nkd,nkd->nk", offsets, normals[idx]))
    return np.median(plane, axis=1), dist[:, 0]


def coverage(points: np.ndarray, template: np.ndarray, reach: float, radius: float) -> np.ndarray:
    """Per scan point: how far beyond normal reach the uncovered template points near it are (0: none)."""
    gap_dist, _ = cKDTree(points).query(template, k=1, workers=1)
    gap = np.clip(gap_dist / reach - 1.0, 0.0, None)
    out = np.zeros(len(points), np.float32)
    uncovered = np.flatnonzero(gap > 0)
    if uncovered.size:
        members = cKDTree(points).query_ball_point(
            template[uncovered], r=radius + gap_dist[uncovered], workers=1
        )
        for value, near in zip(gap[uncovered], members):
            if near:
                out[near] = np.maximum(out[near], value)
    return out


def smooth(points: np.ndarray, values: np.ndarray) -> np.ndarray:
    _, idx = cKDTree(points).query(points, k=SMOOTH_NEIGHBOURS, workers=1)
    return values[idx].mean(axis=1)


def registered_templates(dataset: AnomalyShapeNet, cls: str) -> tuple[list[np.ndarray], np.ndarray, float]:
    scans = [sample.load().points for sample in dataset.train(cls)]
    scale = estimate_scale(scans)
    reference = scans[0][voxel_downsample(scans[0], COORD_VOXEL_SHARE * scale)].astype(np.float32)
    return [scans[0]] + [align(s, reference, scale).apply(s) for s in scans[1:]], reference, scale


def study_class(dataset: AnomalyShapeNet, cls: str) -> list[dict]:
    templates, reference, scale = registered_templates(dataset, cls)
    normals = [estimate_normals(t, k=20) for t in templates]
    spacing = float(np.median(cKDTree(templates[0]).query(templates[0], k=2)[0][:, 1]))
    radius = 2.0 * spacing

    def union(skip: int | None) -> tuple[np.ndarray, np.ndarray]:
        keep = [i for i in range(len(templates)) if i != skip]
        return np.concatenate([templates[i] for i in keep]), np.concatenate([normals[i] for i in keep])

    reach = float(
        np.median(
            [
                np.percentile(cKDTree(templates[i]).query(union(i)[0], k=1, workers=1)[0], 99.5)
                for i in range(len(templates))
            ]
        )
    )
    loo_surf, loo_cov = [], []
    for i, template in enumerate(templates):
        others, other_normals = union(i)
        loo_surf.append(smooth(template, surface_distances(template, cKDTree(others), other_normals)[0]))
        loo_cov.append(smooth(template, coverage(template, others, reach, radius)))
    surf_norm = float(np.percentile(np.concatenate(loo_surf), 99))
    cov_norm = max(float(np.percentile(np.concatenate(loo_cov), 99)), 1e-3)
    everything, all_normals = union(None)
    tree = cKDTree(everything)
    rows = []
    for sample in dataset.test(cls):
        loaded = sample.load()
        points = align(loaded.points, reference, scale).apply(loaded.points)
        surf, nearest = surface_distances(points, tree, all_normals)
        surf = smooth(points, surf) / surf_norm
        cov = smooth(points, coverage(points, everything, reach, radius)) / cov_norm
        mask = loaded.mask if loaded.mask is not None else np.zeros(len(points), bool)
        rows.append(
            {
                "defect": sample.defect_type,
                "label": loaded.object_label,
                "mask": mask,
                "points": points,
                "nn": smooth(points, nearest),
                "surf": surf,
                "cov": cov,
                "fused": np.maximum(surf, cov),
                "summed": surf + cov,
            }
        )
    return rows


def measure(rows: list[dict], cue: str) -> dict[str, float]:
    objects = [float(np.max(r[cue])) for r in rows]
    labels = [r["label"] for r in rows]
    out = {
        "O-AUROC": o_auroc(objects, labels),
        "P-AUROC": p_auroc([r[cue] for r in rows], [r["mask"] for r in rows]),
        "AU-PRO@0.3": au_pro_points(
            [r["points"] for r in rows], [r[cue] for r in rows], [r["mask"] for r in rows]
        ),
    }
    normal = [o for o, r in zip(objects, rows) if r["label"] == 0]
    for defect in sorted({r["defect"] for r in rows if r["label"] == 1}):
        found = [o for o, r in zip(objects, rows) if r["defect"] == defect]
        out[defect] = o_auroc(normal + found, [0] * len(normal) + [1] * len(found))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "root", help="dataset root in the Anomaly-ShapeNet layout (e.g. from python -m evals.bench)"
    )
    parser.add_argument("--classes", default="", help="comma-separated classes (default: all)")
    parser.add_argument("--out", default="surface_cues.json")
    args = parser.parse_args()
    dataset = AnomalyShapeNet(args.root)
    classes = [c for c in args.classes.split(",") if c] or dataset.classes()
    results: dict[str, dict] = {}
    for cls in classes:
        started = time.perf_counter()
        rows = study_class(dataset, cls)
        results[cls] = {cue: measure(rows, cue) for cue in CUES}
        summed = results[cls]["summed"]
        print(
            f"{cls:12s} {time.perf_counter() - started:6.0f} s  summed: "
            + "  ".join(f"{k} {v:.3f}" for k, v in summed.items()),
            flush=True,
        )
    means = {
        cue: {
            key: float(np.nanmean([results[c][cue][key] for c in classes if key in results[c][cue]]))
            for key in results[classes[0]][cue]
        }
        for cue in CUES
    }
    for cue in CUES:
        print(f"mean {cue:7s} " + "  ".join(f"{k} {v:.3f}" for k, v in means[cue].items()))
    with open(args.out, "w") as handle:
        json.dump({"classes": results, "means": means}, handle, indent=1)


if __name__ == "__main__":
    main()
