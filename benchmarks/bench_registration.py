"""Registration of 30k-point scans: the current code against a base commit, side by side on the same scans.

    python benchmarks/bench_registration.py [--base REV] [--parts bracket,flange,gear] [--out FILE]

The base (default: the merge-base of HEAD and main, i.e. the code before this branch) is checked out into
a temporary ``git worktree``; each side runs in its own subprocess with its own tree first on ``sys.path``,
on the same scans (written once as .npy), part after part, base first. Per scan it records the wall and CPU
seconds of ``detector.registration.align``, the fitness, how the pose was found (the current code: "icp" =
early stop, "global" = FPFH + RANSAC) and two accuracies in units of the class scale:

* ``gt_error``: RMS distance between the noise-free scan points after registration and where they belong (the
  scans are made from known poses), the pose error itself;
* ``residual``: the median distance of the registered scan to the reference, which is also right for a
  symmetric part registered onto one of its symmetric poses (then ``gt_error`` is large for both sides alike).

Poses: rotations of 1-5 degrees about random axes plus a shift of up to 1% of the extent (the benchmark's
range), and 20 and 60 degrees (users' data; what the global fallback is for). The current code prepares the
reference once (``RegistrationTarget``, as a fitted class does); that one-off cost is reported separately.
The load average is printed: on a shared machine the wall times are only as good as the quiet they had, the
CPU times and the ratios less affected.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SMALL_POSES = (1.0, 2.0, 3.0, 4.0, 5.0, 5.0)
LARGE_POSES = (20.0, 60.0)
NOISE_OF_DIAGONAL = 0.0015


def make_scans(part: str, points: int, seed: int, work: Path) -> Path:
    """Reference + posed scans of one procedural part, with the noise-free moved points and their truth."""
    from scipy.spatial.transform import Rotation

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from scans.parts import part_mesh, sample_surface

    mesh = part_mesh(part)
    rng = np.random.default_rng(seed)
    out = work / part
    out.mkdir(parents=True, exist_ok=True)
    reference, normals = sample_surface(mesh, points, seed=seed)
    diagonal = float(np.linalg.norm(reference.max(0) - reference.min(0)))
    noisy = reference + rng.normal(0, NOISE_OF_DIAGONAL * diagonal, (len(reference), 1)) * normals
    np.save(out / "reference.npy", noisy.astype(np.float32))
    for i, degrees in enumerate(SMALL_POSES + LARGE_POSES):
        clean, normals = sample_surface(mesh, points, seed=seed + 1 + i)
        axis = rng.normal(size=3)
        rotation = Rotation.from_rotvec(np.radians(degrees) * axis / np.linalg.norm(axis)).as_matrix()
        centre, shift = clean.mean(0), rng.uniform(-0.01, 0.01, 3) * diagonal
        noise = rng.normal(0, NOISE_OF_DIAGONAL * diagonal, (len(clean), 1)) * normals
        scan = ((clean + noise) - centre) @ rotation.T + centre + shift
        np.save(out / f"scan{i}.npy", scan.astype(np.float32))
        np.save(out / f"clean{i}.npy", ((clean - centre) @ rotation.T + centre + shift).astype(np.float32))
        np.save(out / f"truth{i}.npy", clean.astype(np.float32))
        (out / f"pose{i}.txt").write_text(str(degrees))
    return out


def worker(folder: Path) -> dict:
    """Runs inside the subprocess of one side: align every scan of ``folder`` and measure."""
    from detector.grouping import estimate_scale
    from detector.registration import COORD_VOXEL_SHARE, align
    from scans.geometry import voxel_downsample

    first = np.load(folder / "reference.npy")
    scale = estimate_scale([first])
    reference = first[voxel_downsample(first, COORD_VOXEL_SHARE * scale)]
    target, prepare_s = reference, 0.0
    try:
        from detector.registration import RegistrationTarget  # the current code; the base has none

        start = time.perf_counter()
        target = RegistrationTarget(reference, scale)
        prepare_s = time.perf_counter() - start
    except ImportError:
        pass
    rows = []
    for i in range(len(SMALL_POSES + LARGE_POSES)):
        scan = np.load(folder / f"scan{i}.npy")
        wall, cpu = time.perf_counter(), time.process_time()
        alignment = align(scan, target, scale, seed=0)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        moved = alignment.apply(np.load(folder / f"clean{i}.npy"))
        gt_error = float(np.sqrt(np.mean(np.sum((moved - np.load(folder / f"truth{i}.npy")) ** 2, axis=1))))
        rows.append(
            {
                "pose_deg": float((folder / f"pose{i}.txt").read_text()),
                "wall_s": wall,
                "cpu_s": cpu,
                "fitness": alignment.fitness,
                "method": getattr(alignment, "method", "global"),
                "gt_error": gt_error / scale,
                "residual": float(np.median(alignment.template_distance)) / scale,
            }
        )
    return {"prepare_s": prepare_s, "rows": rows}


def run_side(tree: Path, folder: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "import importlib.util as u; s = u.spec_from_file_location('bench', sys.argv[2]);"
        "m = u.module_from_spec(s); s.loader.exec_module(m);"
        "print(json.dumps(m.worker(Path(sys.argv[3]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tree), str(Path(__file__).resolve()), str(folder)],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"bench_registration: the worker in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict], small: bool) -> dict:
    chosen = [r for r in rows if (r["pose_deg"] <= 5.0) == small]
    return {
        "wall_s": statistics.median(r["wall_s"] for r in chosen),
        "cpu_s": statistics.median(r["cpu_s"] for r in chosen),
        "max_wall_s": max(r["wall_s"] for r in chosen),
        "gt_error": statistics.median(r["gt_error"] for r in chosen),
        "residual": statistics.median(r["residual"] for r in chosen),
        "min_fitness": min(r["fitness"] for r in chosen),
        "early_stops": sum(r["method"] == "icp" for r in chosen),
        "scans": len(chosen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="old code's git revision (default: merge-base HEAD main)")
    ap.add_argument("--parts", default="bracket,flange,gear")
    ap.add_argument("--points", type=int, default=30_000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/registration.json")
    args = ap.parse_args()
    from base_code import (  # beside this script; not in its child runs
        base_revision,
        base_worktree,
        head_revision,
    )

    base = base_revision(args.base)
    load_before = os.getloadavg()[0]
    results = {"base": base, "head": head_revision(), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="bench-registration-") as tmp:
        with base_worktree(base, Path(tmp) / "base") as tree:
            for part in args.parts.split(","):
                folder = make_scans(part, args.points, seed=7, work=Path(tmp) / "scans")
                old, new = run_side(tree, folder), run_side(ROOT, folder)
                results["parts"][part] = {"base": old, "current": new}
    results["load_avg"] = [load_before, os.getloadavg()[0]]
    print(
        f"base {base[:10]} vs current {results['head'][:10]}; load average {load_before:.1f} -> "
        f"{results['load_avg'][1]:.1f}"
    )
    print(
        "| part | poses | base wall s | current wall s | wall ratio | base cpu s | current cpu s | cpu ratio "
        "| base / current pose error | base / current residual | current early stops | prepare s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for part, sides in results["parts"].items():
        for small in (True, False):
            old, new = summarise(sides["base"]["rows"], small), summarise(sides["current"]["rows"], small)
            sides["summary_" + ("small" if small else "large")] = {"base": old, "current": new}
            print(
                f"| {part} | {'1-5 deg' if small else '20, 60 deg'} | {old['wall_s']:.2f} | "
                f"{new['wall_s']:.2f} | "
                f"{new['wall_s'] / old['wall_s']:.2f} | {old['cpu_s']:.2f} | {new['cpu_s']:.2f} | "
                f"{new['cpu_s'] / old['cpu_s']:.2f} | {old['gt_error']:.4f} / {new['gt_error']:.4f} | "
                f"{old['residual']:.4f} / {new['residual']:.4f} | {new['early_stops']}/{new['scans']} | "
                f"{sides['current']['prepare_s']:.2f} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
