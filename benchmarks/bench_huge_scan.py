"""Wall time and peak memory of `agent.run` on huge scans: 1M and 10M points side by side (issue 10 item 10).

    python benchmarks/bench_huge_scan.py [--sizes 1000000,10000000] [--out benchmarks/results/huge_scan.json]

What is measured: one `python -m agent.run <scan>.npy --bank <fit> --no-render` per size, each in a fresh
subprocess, so `ru_maxrss` is that run's own peak (reading the file, the analysis of at most
`--max-analysis-points` points, spreading the scores back to every point, writing scores.npy/.ply and
report.json; peak = VmHWM, see `peak_mb`).
The fit is the default Point-MAE architecture trained for only `--train-steps` steps: scoring costs the same
whatever the training length, and the benchmark is about the cost of size, not accuracy. Scans are made like
`evals.bench` makes them (surface sampling + `scan_like` sensor noise and pose). The load average is recorded
before and after: on a shared machine the timings are only as good as the quiet they were taken in.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np

from scans import strict_json

PART = "flange"
TEMPLATE_POINTS = 30_000


def peak_mb() -> float:
    """This process's peak resident memory since its exec (VmHWM). Not ru_maxrss: Linux carries the forking
    parent's high-water mark over the exec into the child's ru_maxrss: a child of a big parent reads big."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on most systems


def make_scan(count: int, seed: int) -> np.ndarray:
    """A sensor-like float32 scan of the benchmark part with ``count`` points."""
    from scans.parts import part_mesh, sample_surface, scan_like

    clean, normals = sample_surface(part_mesh(PART), count, seed=seed)
    return scan_like(clean, normals, seed=seed + 100)[0].astype(np.float32)


def prepare(work: Path, sizes: list[int], train_steps: int) -> Path:
    """Fit the class (saved under work/fit) and write one scan per size as work/scan_<size>.npy."""
    from detector.fitted import DetectorConfig, fit_class

    config = replace(DetectorConfig(), train_steps=train_steps)
    fitted = fit_class([make_scan(TEMPLATE_POINTS, seed=i) for i in range(4)], config)
    bank = fitted.save(work / "fit")
    for size in sizes:
        np.save(work / f"scan_{size}.npy", make_scan(size, seed=50))
    return bank


def child(scan: str, bank: str, out: str, cap: int | None) -> None:
    """Run agent.run in this process and print its wall time, peak RSS and exit code as one json line."""
    import agent.run as run_cli

    argv = [scan, "--bank", bank, "--out", out, "--no-render"]
    if cap is not None:
        argv += ["--max-analysis-points", str(cap)]
    start = time.perf_counter()
    code = run_cli.main(argv)
    print("RESULT " + strict_json.dumps({"wall_s": time.perf_counter() - start, "peak_mb": peak_mb(),
                                         "exit": code}))


def measure(scan: Path, bank: Path, out: Path, cap: int | None) -> dict:
    command = [sys.executable, __file__, "--child", str(scan), str(bank), str(out)]
    if cap is not None:
        command += ["--cap", str(cap)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{scan}: agent.run failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n"
                         f"{done.stderr[-2000:]}")
    import json

    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated point counts")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--cap", type=int, help="--max-analysis-points for agent.run (default: its own)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "huge_scan.json"))
    parser.add_argument("--child", nargs=3, metavar=("SCAN", "BANK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, cap=args.cap)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-huge-") as tmp:
        work = Path(tmp)
        bank = prepare(work, sizes, args.train_steps)
        results = {}
        for size in sizes:
            results[size] = measure(work / f"scan_{size}.npy", bank, work / "runs", args.cap)
            scores = np.load(work / "runs" / f"scan_{size}" / "scores.npy", mmap_mode="r")
            results[size]["scores_rows"] = len(scores)
            got = results[size]
            print(f"{size:>11,} points: {got['wall_s']:7.1f} s  {got['peak_mb']:7.0f} MB peak  "
                  f"(scores.npy rows {len(scores):,})", flush=True)
    load_after = os.getloadavg()[0]
    small, large = results[sizes[0]], results[sizes[-1]]
    ratio = {"points": sizes[-1] / sizes[0], "wall": large["wall_s"] / small["wall_s"],
             "peak_memory": large["peak_mb"] / small["peak_mb"]}
    print(f"ratio {sizes[-1]:,} / {sizes[0]:,} points: x{ratio['points']:.0f} points -> "
          f"wall x{ratio['wall']:.2f}, "
          f"peak memory x{ratio['peak_memory']:.2f}; load average {load_before:.1f} -> {load_after:.1f}")
    document = {"sizes": sizes, "results": {str(k): v for k, v in results.items()}, "ratio": ratio,
                "cap": args.cap, "train_steps": args.train_steps,
                "load_average": {"before": load_before, "after": load_after}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json.dumps(document, what=str(out), indent=2))


if __name__ == "__main__":
    main()
