"""`agent.run` warm and cold, the current code against a base commit, on the same fitted class and scans.

    python benchmarks/bench_run.py --bank FITTED_DIR --scans SCAN_DIR [--base REV] [--repeats 3]

Both sides run the documented command line, ``python -m agent.run ... --bank ... --out ...`` (policy
backend, default flags), each in a subprocess whose ``PYTHONPATH`` is its own tree (the base: a temporary
``git worktree`` of ``--base``, default the merge-base of HEAD and main). The fitted folder is the same for
both (its format did not change), so the difference is the run's code alone.

* warm: one run over the whole scan folder; each scan's report.json ``seconds.total`` (and ``analyse``),
  the first scan dropped (it pays the process's one-off costs: imports, loading the fit, preparing the
  registration template). Medians.
* cold: a single scan (the folder's first) in a fresh process, wall time of the whole command, median of
  ``--repeats``, sides alternating so a change of load hits both.
* imports: one more cold run with ``-X importtime``: whether transformers, langchain, openai (which a policy
  run must not import), open3d, sklearn and torch were imported.

The load average is printed: on a shared machine the wall times are only as good as the quiet they had.
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

from base_code import ROOT, base_revision, base_worktree

WATCHED = (
    "transformers", "langchain", "langchain_core", "openai", "open3d", "sklearn", "matplotlib", "torch"
)


def run_cli(tree: Path, args: list[str], extra: list[str] = ()) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *extra, "-m", "agent.run", *args],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench_run: agent.run in {tree} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return wall, done


def warm(tree: Path, bank: Path, scans: Path, out: Path) -> dict:
    run_cli(tree, [str(scans), "--bank", str(bank), "--out", str(out)])
    reports = sorted(out.glob("*/report.json"))
    seconds = [json.loads(r.read_text())["seconds"] for r in reports]
    later = seconds[1:] or seconds
    return {
        "scans": len(seconds),
        "total_s": statistics.median(s["total"] for s in later),
        "analyse_s": statistics.median(s["analyse"] for s in later),
        "first_total_s": seconds[0]["total"],
    }


def imported(tree: Path, bank: Path, scan: Path, out: Path) -> dict[str, bool]:
    _, done = run_cli(tree, [str(scan), "--bank", str(bank), "--out", str(out)], ["-X", "importtime"])
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            names.add(line.rsplit("|", 1)[-1].strip().split(".")[0])
    return {name: name in names for name in WATCHED}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=Path, required=True, help="a fitted class folder (agent.fit --out)")
    ap.add_argument("--scans", type=Path, required=True, help="a folder of scans of that class")
    ap.add_argument("--base", default=None, help="old code's git revision (default: merge-base HEAD main)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/run.json")
    args = ap.parse_args()
    base = base_revision(args.base)
    first = sorted(p for p in args.scans.iterdir() if p.is_file())[0]
    load_before = os.getloadavg()[0]
    results: dict = {"base": base, "bank": str(args.bank), "scans": str(args.scans)}
    with (
        tempfile.TemporaryDirectory(prefix="bench-run-") as tmp,
        base_worktree(base, Path(tmp) / "base") as tree,
    ):
        sides = {"base": tree, "current": ROOT}
        for name, side in sides.items():
            results[name] = {"warm": warm(side, args.bank, args.scans, Path(tmp) / f"warm-{name}")}
        cold: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.repeats):
            for name, side in sides.items():
                out = Path(tmp) / f"cold-{name}-{r}"
                cold[name].append(
                    run_cli(side, [str(first), "--bank", str(args.bank), "--out", str(out)])[0]
                )
        for name, side in sides.items():
            results[name]["cold_s"] = statistics.median(cold[name])
            results[name]["cold_runs_s"] = cold[name]
            results[name]["imports"] = imported(side, args.bank, first, Path(tmp) / f"imports-{name}")
    results["load_avg"] = [load_before, os.getloadavg()[0]]
    old, new = results["base"], results["current"]
    print(f"base {base[:10]}; load average {load_before:.1f} -> {results['load_avg'][1]:.1f}")
    print("| measure | base | current | current / base |")
    print("|---|---|---|---|")
    for label, a, b in (
        ("warm s/scan (report.json seconds.total)", old["warm"]["total_s"], new["warm"]["total_s"]),
        ("warm analyse s/scan", old["warm"]["analyse_s"], new["warm"]["analyse_s"]),
        ("cold single scan, wall s", old["cold_s"], new["cold_s"]),
    ):
        print(f"| {label} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    for name in WATCHED:
        print(f"| imports {name} | {old['imports'][name]} | {new['imports'][name]} | |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
