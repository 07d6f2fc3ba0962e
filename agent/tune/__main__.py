"""`python -m agent.tune episodes|train`: make tuning episodes, then train an adapter or the ranker on them.

    python -m agent.tune episodes --out episodes/               # training parts only, never a benchmark class
    python -m agent.tune episodes --normals my_scans/ --out episodes/   # your own normal scans, defects made
    python -m agent.tune train --episodes episodes/ --out adapter/ --method lora|prompt|ranker|recogniser

Exit codes: 0 done, 2 bad input (the message names the folder and the problem), 3 the model or peft is
missing.
Nothing is written at --out unless the whole result is (temporary folder, renamed at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from agent.backends.base import BackendUnavailable
from agent.backends.hf_rows import ROW_QUESTIONS
from agent.cli_args import EXIT_BACKEND, EXIT_BAD_INPUT, EXIT_OK, positive_int, run_cli, stderr_say
from agent.tune.episode_scans import NORMAL_TARGETS, EpisodeConfig
from agent.tune.episodes import EPISODES_FILE, MANIFEST_FILE, part_episodes, read_episodes
from agent.tune.train import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent.tune", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("episodes", help="generate inspection episodes (JSONL) from the training parts")
    e.add_argument(
        "--out", required=True, type=Path, help="new folder for episodes.jsonl, fits and test scans"
    )
    e.add_argument("--parts", default=None, help="comma-separated training parts (default: all)")
    e.add_argument(
        "--normals",
        type=Path,
        default=None,
        help="a folder of your own normal scans instead of the training parts (defects are synthesized)",
    )
    e.add_argument("--scans-per-part", type=int, default=EpisodeConfig.scans_per_part)
    e.add_argument("--points", type=int, default=EpisodeConfig.points)
    e.add_argument("--overview-tokens", type=int, default=EpisodeConfig.overview_tokens)
    e.add_argument("--verbalization", choices=("compact", "full"), default=EpisodeConfig.verbalization)
    e.add_argument(
        "--compact-rows",
        type=positive_int,
        default=EpisodeConfig.compact_rows,
        help="patches the compact overview shows",
    )
    e.add_argument(
        "--max-target-ids",
        type=positive_int,
        default=EpisodeConfig.max_target_ids,
        help="patch ids a target names",
    )
    e.add_argument(
        "--normal-target",
        choices=NORMAL_TARGETS,
        default=EpisodeConfig.normal_target,
        help="a normal scan's target: an empty report, or its top patch at the lowest confidence",
    )
    e.add_argument(
        "--guided-per-scan",
        type=int,
        default=EpisodeConfig.guided_per_scan,
        help="guided episodes per scan beside its unguided one",
    )
    e.add_argument(
        "--feature-share",
        type=float,
        default=EpisodeConfig.feature_share,
        help="training scans that also get a by-design feature (ridge or bolt holes) for normal-feature "
        "guidance to name",
    )
    e.add_argument(
        "--feature-vary",
        type=float,
        default=EpisodeConfig.feature_vary,
        help="draw the features' sizes from (1 - v, 1 + v) x the defaults and 2-4 holes (0: always the "
        "defaults)",
    )
    e.add_argument(
        "--severity",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=EpisodeConfig.severity,
        help="draw each defect's severity (depth and share, as the benchmark's --severity) uniformly from "
        "LOW..HIGH (default 1 1: the benchmark's defects)",
    )
    e.add_argument("--detector-steps", type=int, default=None, help="Point-MAE steps of each part's fit")
    pose = e.add_mutually_exclusive_group()
    pose.add_argument(
        "--register", action="store_const", const=True, dest="register", help="force registered fits"
    )
    pose.add_argument(
        "--no-register", action="store_const", const=False, dest="register", help="force unregistered fits"
    )
    # neither flag: each part's fit measures and decides, as agent.fit and evals.run do by default, so the
    # episodes show the statistics (surface cues included) that agent.run will show
    e.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="train a LoRA / prompt-tuning adapter or the ranker baseline")
    t.add_argument("--episodes", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path, help="new adapter folder")
    t.add_argument(
        "--method",
        choices=("lora", "prompt", "ranker", "recogniser"),
        default="lora",
        help="recogniser: the normal-feature recognisers that apply guidance calling a feature normal",
    )
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--max-minutes", type=float, default=None, help="stop early after this long (recorded)")
    t.add_argument("--max-tokens", type=int, default=3072, help="skip longer examples")
    t.add_argument("--lora-layers", type=int, default=8, help="LoRA on the last N decoder layers (0 = all)")
    t.add_argument(
        "--target",
        choices=("decisions", "full", "rows"),
        default="decisions",
        help="loss on the call up to the first region's patch ids (default), on the whole call, or on a "
        "yes/no per shown patch row (rows: the report names the rows over a threshold fitted on training)",
    )
    t.add_argument(
        "--row-question",
        choices=tuple(ROW_QUESTIONS),
        default=TrainConfig.row_question,
        help="target rows: name each row's patch id (id) or quote the row's line from the table (line)",
    )
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    return p


# what a recogniser file records of the episodes it was trained on
RECIPE_KEYS = (
    "parts", "scans_per_part", "feature_share", "feature_vary", "severity", "points", "seed"
)


def _fresh_out(out: Path) -> None:
    if out.exists():
        raise ValueError(f"{out}: already exists; give a new folder (nothing is overwritten)")


def make_episodes(args: argparse.Namespace) -> int:
    _fresh_out(args.out)
    config = EpisodeConfig(
        scans_per_part=args.scans_per_part,
        points=args.points,
        seed=args.seed,
        overview_tokens=args.overview_tokens,
        verbalization=args.verbalization,
        register=args.register,
        max_target_ids=args.max_target_ids,
        compact_rows=args.compact_rows,
        normal_target=args.normal_target,
        feature_share=args.feature_share,
        feature_vary=args.feature_vary,
        severity=tuple(args.severity),
        guided_per_scan=args.guided_per_scan,
    )
    if args.parts:
        config = replace(config, parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()))
    detector = replace(config.detector, register=args.register, seed=args.seed)
    if args.detector_steps is not None:
        detector = replace(detector, train_steps=args.detector_steps)
    config = replace(config, detector=detector)
    from scans.training_parts import TRAINING_PARTS, is_held_out

    if args.normals is not None:  # your own part: one "part" named after its folder
        config = replace(config, parts=(args.normals.resolve().name,))
    for part in config.parts if args.normals is None else ():
        if is_held_out(part) or part not in TRAINING_PARTS:
            raise ValueError(
                f"--parts: {part!r} is not a training part (known: {', '.join(TRAINING_PARTS)}; "
                "dev-benchmark classes are held out)"
            )
    tmp = args.out.with_name(args.out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    counts: dict[str, int] = {}
    try:
        tmp.mkdir(parents=True)
        with (tmp / EPISODES_FILE).open("w", encoding="utf-8") as handle:
            for part in config.parts:
                for episode in part_episodes(part, config, out=tmp, folder=args.normals):
                    handle.write(episode.to_json() + "\n")
                    counts[episode.split] = counts.get(episode.split, 0) + 1
                print(f"{part}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        digest = hashlib.sha256((tmp / EPISODES_FILE).read_bytes()).hexdigest()
        manifest = {
            "config": config.to_dict(),
            "episodes": counts,
            "episodes_sha256": digest,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        tmp.rename(args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"out": str(args.out), "episodes": counts, "episodes_sha256": digest}))
    return EXIT_OK


def _manifest(episodes: Path) -> dict:
    """The episodes folder's manifest (how they were made), {} when it has none."""
    path = episodes / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def train(args: argparse.Namespace) -> int:
    _fresh_out(args.out)
    episodes = read_episodes(args.episodes, split="train")
    if not episodes:
        raise ValueError(f"{args.episodes}: no training episodes in {EPISODES_FILE}")
    if args.method == "recogniser":
        from agent.tune.recogniser_fit import fit_recognisers, save_recognisers

        model = fit_recognisers(episodes, seed=args.seed)
        manifest = _manifest(args.episodes)
        if manifest:  # the recipe: which episodes, made how
            made = manifest.get("config", {})
            model["episodes"] = {
                "sha256": manifest.get("episodes_sha256"),
                **{k: made.get(k) for k in RECIPE_KEYS},
            }
        path = save_recognisers(model, args.out)
        print(json.dumps({"out": str(path)}))
        return EXIT_OK
    if args.method == "ranker":
        from agent.tune.ranker_fit import fit_ranker, save_ranker

        made = _manifest(args.episodes).get("config", {})
        model = fit_ranker(
            episodes,
            seed=args.seed,
            verbalization=made.get("verbalization", "full"),
            compact_rows=made.get("compact_rows"),
        )
        path = save_ranker(model, args.out)
        print(json.dumps({"out": str(path)}))
        return EXIT_OK
    from agent.backends.hf_backend import HFBackend
    from agent.tune.train import adapter_digest, train_adapter

    config = TrainConfig(
        method=args.method,
        steps=args.steps,
        lr=args.lr,
        max_minutes=args.max_minutes,
        max_tokens=args.max_tokens,
        lora_layers=args.lora_layers,
        target=args.target,
        row_question=args.row_question,
        threads=args.threads,
        seed=args.seed,
    )
    recipe = train_adapter(
        args.episodes,
        args.out,
        config,
        episodes=episodes,
        # the base model: a default HFBackend loads the shipped adapter merged into the weights, and a LoRA
        # trained on top of it is a delta that means nothing on the base it is loaded onto
        backend_factory=lambda: HFBackend(threads=args.threads, seed=args.seed, adapter="none"),
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(
        json.dumps(
            {
                "out": str(args.out),
                "sha256": adapter_digest(args.out),
                "steps_done": recipe["steps_done"],
                "seconds": recipe["seconds"],
                "loss_last10": recipe["loss_last10"],
            }
        )
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rules = [
        (BackendUnavailable, "error", EXIT_BACKEND),  # the model, transformers or peft is missing
        ((ValueError, FileNotFoundError, FileExistsError), "error", EXIT_BAD_INPUT),
    ]
    return run_cli(
        lambda: make_episodes(args) if args.command == "episodes" else train(args), stderr_say, rules
    )


if __name__ == "__main__":
    sys.exit(main())
