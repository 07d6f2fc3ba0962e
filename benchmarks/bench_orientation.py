"""Normal orientation for the surface cues' side: signs right and seconds, away-from-centroid vs propagated.

Why this exists: `detector.surface_cues` reads the side of the surface a scan point lies on (added or removed
material) along the templates' normals, and a fit now orients them along the surface (`scans.orientation`)
instead of away from the centroid. This prints, per part and sample size, the share of normal signs that agree
with the part's mesh normals and the seconds each way takes, side by side in one run.

    python benchmarks/bench_orientation.py [--points 8000,28000,100000] [--parts sprocket,bracket,...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from scans.geometry import estimate_normals
from scans.orientation import oriented_normals
from scans.parts import part_mesh, sample_surface
from scans.training_parts import TRAINING_PARTS, training_mesh

PARTS = (*TRAINING_PARTS, "flange", "gear", "pipe_elbow", "hex_nut", "bracket", "shaft")


def _timed(fn, *args) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="8000,28000,100000")
    parser.add_argument("--parts", default=",".join(PARTS))
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.points.split(",")]
    print(f"{'part':17s} {'points':>7s} {'centroid':>9s} {'propagated':>10s} {'s centroid':>10s} "
          f"{'s propagated':>12s} {'ratio':>6s}")
    for name in args.parts.split(","):
        mesh = training_mesh(name) if name in TRAINING_PARTS else part_mesh(name)
        for n in sizes:
            points, truth = sample_surface(mesh, n, seed=0)
            old, old_s = _timed(estimate_normals, points)
            new, new_s = _timed(oriented_normals, points)

            def right(normals: np.ndarray) -> float:
                return float(np.mean(np.einsum("ij,ij->i", normals, truth) > 0))

            print(f"{name:17s} {n:7d} {right(old):9.3f} {right(new):10.3f} {old_s:10.2f} {new_s:12.2f} "
                  f"{new_s / max(old_s, 1e-9):6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
