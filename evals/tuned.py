"""Backends on the held-out test episodes of `agent.tune`: the full pipeline per scan, scored against ground
truth.

    python -m evals.tuned --episodes EPISODES --backends policy,ranker=RANKER.json,hf,hf=ADAPTER --limit 12

Every test episode is run through `agent.pipeline.inspect_scan` on its saved scan with its part's saved fit,
its
guidance and the overview size the episodes were made with, so each backend sees what the tuned model was
trained
on, on parts and paraphrases it never saw. Per backend: patch recall (defect episodes where a reported patch
is a
target patch), false-region rate (reported regions without a target patch), empty reports on episodes whose
target
is empty, fallbacks, seconds and tokens; over the unguided episodes also O-AUROC and P-AUROC from the
verifier.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import BackendUnavailable, get_backend
from agent.pipeline import InspectionConfig, inspect_scan
from agent.tune.episodes import MANIFEST_FILE, read_episodes
from detector.fitted import FittedClass
from evals.config import key_value_options
from evals.metrics import o_auroc, p_auroc
from scans.files import atomic_write_text


def backend_from_spec(spec: str):
    """ "policy", "ranker=FILE", "hf" (the packaged adapter), "hf=none" (base model), "hf=ADAPTER_DIR",
    "hf=;guidance_in_prompt=false" (options after ";"), "random-regions" -> (label, backend)."""
    name, _, arg = spec.partition("=")
    if name == "ranker":  # labelled by the model's folder, so two rankers can be compared
        return f"ranker:{Path(arg).parent.name}" if arg else name, get_backend("ranker", model=arg or None)
    if name == "hf":  # "hf=ADAPTER;key=value..." passes the options on (e.g. guidance_in_prompt=false)
        adapter, *options = arg.split(";")
        kwargs = key_value_options(";".join(options)) or {}  # the harness's own reading of key=value options
        if options and not kwargs:
            raise ValueError(f"backend {spec!r}: options after ';' must be key=value")
        backend = get_backend("hf", adapter=adapter or None, threads=2, **kwargs)
        label = "hf:base" if backend.adapter is None else f"hf:{Path(backend.adapter).name}"
        label += "".join(f";{o}" for o in options)
        return label, backend
    return name, get_backend(name)


def _reported(inspection) -> list[list[int]]:
    return [list(r.patch_ids) for r in inspection.verification.regions]


@dataclass
class TestScan:
    """One held-out test scan with its part's fit, its analysis and its unguided episode's ground truth."""

    name: str
    part: str
    points: np.ndarray
    labels: np.ndarray
    fit: FittedClass
    analysis: Any
    truth: list[int]
    defect: str | None


@dataclass
class TestSet:
    episodes: list[dict]
    by_name: dict[str, TestScan]  # every scan the episodes use
    budget: int  # the overview's token budget the episodes were made with
    seed: int

    @property
    def scans(self) -> list[TestScan]:
        """The scans that have an unguided episode (so their ground truth without guidance is known)."""
        plain = {e["scan"] for e in self.episodes if e["guidance"] is None}
        return [s for name, s in self.by_name.items() if name in plain]


def load_test_scans(directory: Path, limit: int | None = None) -> TestSet:
    """The test episodes (`limit` of them, evenly spread over the file), their saved scans, fits and
    analyses."""
    episodes = read_episodes(directory, split="test")
    if limit is not None and 0 < limit < len(episodes):  # evenly spread, so every part is in a short run
        episodes = [episodes[i * len(episodes) // limit] for i in range(limit)]
    if not episodes:
        raise ValueError(f"{directory}: no test episodes")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    fits = {
        part: FittedClass.load(directory / "parts" / part) for part in sorted({e["part"] for e in episodes})
    }
    scans: dict[str, TestScan] = {}
    for e in episodes:
        stem = e["scan"]
        if stem not in scans:
            with np.load(directory / "scans" / f"{stem}.npz") as data:
                points, labels = data["points"], data["labels"].astype(bool)
            fit = fits[e["part"]]
            scans[stem] = TestScan(stem, e["part"], points, labels, fit, fit.analyse(points), [], e["defect"])
        if e["guidance"] is None:
            scans[stem].truth = list(e["truth_patches"])
    return TestSet(
        episodes,
        scans,
        int(manifest["config"]["overview_tokens"]),
        int(manifest["config"]["seed"]),
    )


def evaluate(directory: Path, specs: list[str], limit: int | None = None, log=print) -> dict:
    """Per-backend metrics on the test episodes (`limit` of them, evenly spread over the file)."""
    tests = load_test_scans(directory, limit)
    episodes, budget = tests.episodes, tests.budget
    results = {}
    for spec in specs:
        label, backend = backend_from_spec(spec)
        rows = []
        for e in episodes:
            scan = tests.by_name[e["scan"]]
            guidance = e["guidance"]["text"] if e["guidance"] else None
            config = InspectionConfig(token_budget=budget, guidance=guidance, seed=tests.seed)
            started = time.perf_counter()
            inspection = inspect_scan(scan.points, scan.fit, backend, config=config, analysis=scan.analysis)
            regions = _reported(inspection)
            truth = set(e["truth_patches"])
            rows.append(
                {
                    "id": e["id"],
                    "guided": e["guidance"] is not None,
                    "truth": bool(truth),
                    "hit": bool(truth & {p for r in regions for p in r}),
                    "regions": len(regions),
                    "false_regions": sum(1 for r in regions if not truth & set(r)),
                    "fallback": inspection.outcome.fallback_used,
                    "tokens": inspection.outcome.usage.total_tokens,
                    "seconds": time.perf_counter() - started,
                    "object_score": inspection.object_score,
                    "labels": scan.labels,
                    "point_scores": inspection.point_scores,
                    "normal": not scan.labels.any(),
                }
            )
        results[label] = summarise(rows)
        log(f"{label}: {json.dumps(results[label])}")
    return {"episodes": len(episodes), "overview_tokens": budget, "backends": results}


def summarise(rows: list[dict]) -> dict:
    """The metrics of one backend over its episode rows (see the module docstring)."""

    def share(values: list[bool]) -> float | None:
        return round(float(np.mean(values)), 3) if values else None

    defect = [r for r in rows if r["truth"]]
    empty = [r for r in rows if not r["truth"]]
    n_regions = sum(r["regions"] for r in rows)
    out = {
        "episodes": len(rows),
        "recall": share([r["hit"] for r in defect]),
        "recall_guided": share([r["hit"] for r in defect if r["guided"]]),
        "false_region_rate": round(sum(r["false_regions"] for r in rows) / n_regions, 3)
        if n_regions
        else None,
        "empty_when_target_empty": share([r["regions"] == 0 for r in empty]),
        "fallbacks": sum(r["fallback"] for r in rows),
        "own_report_rate": share([not r["fallback"] for r in rows]),
        "seconds_per_episode": round(float(np.mean([r["seconds"] for r in rows])), 2),
        "tokens_per_episode": round(float(np.mean([r["tokens"] for r in rows])), 1),
    }
    plain = [r for r in rows if not r["guided"]]
    kinds = {r["normal"] for r in plain}
    out["o_auroc"] = (
        round(o_auroc([r["object_score"] for r in plain], [int(not r["normal"]) for r in plain]), 3)
        if len(kinds) == 2
        else None
    )
    defective = [r for r in plain if not r["normal"]]
    out["p_auroc"] = (
        round(p_auroc([r["point_scores"] for r in plain], [r["labels"] for r in plain]), 3)
        if defective
        else None
    )
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def episode_parser(prog: str, description: str, backends_help: str) -> argparse.ArgumentParser:
    """The flags that evals.tuned and evals.guided share: the episodes, the backends, a limit and --out."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--episodes", required=True, type=Path, help="a folder made by python -m agent.tune episodes"
    )
    p.add_argument("--backends", default="policy", help=f"comma-separated: {backends_help}")
    p.add_argument("--limit", type=int, default=None, help="N test scans, evenly spread over the parts")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p


def run_episode_eval(args: argparse.Namespace, evaluate_fn: Callable[..., dict]) -> tuple[int, dict | None]:
    """(exit code, result): ``evaluate_fn(episodes, backends, limit, log=...)`` with bad input -> 2 and an
    unavailable backend -> 3, the JSON written atomically to ``--out`` and printed."""
    try:
        result = evaluate_fn(
            args.episodes,
            [s for s in args.backends.split(",") if s],
            args.limit,
            log=lambda line: print(line, file=sys.stderr),
        )
    except BackendUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 3, None
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2, None
    text = json.dumps(result, indent=1)
    if args.out is not None:
        atomic_write_text(args.out, text)
    print(text)
    return 0, result


def main(argv: list[str] | None = None) -> int:
    p = episode_parser(
        "python -m evals.tuned", __doc__.split("\n")[0], "policy, ranker=FILE, hf, hf=none, hf=ADAPTER"
    )
    return run_episode_eval(p.parse_args(argv), evaluate)[0]


if __name__ == "__main__":
    sys.exit(main())
