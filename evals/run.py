"""`python -m evals.run --data <layout>:<root> [--methods ...] [--backends ...] [--out DIR]`: the eval harness
CLI.

Parses arguments, shows progress and prints where the results are; the work is `evals.harness.run_harness`. A
rerun
into the same --out resumes (skips every finished method/backend x scan). Exit codes: 0 ok, 1 some scans
failed
(recorded in results.jsonl and the report), 2 bad input, 130 interrupted (the partial result stays
consistent).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from agent.cli_args import (
    DEFAULT_MAX_SECONDS,
    EXIT_BAD_INPUT,
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    console_say,
    context_window_arg,
    exits_on,
    run_cli,
    seconds_arg,
)
from agent.quiet import quiet_third_party


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


EPILOG = """examples:
  scanagent eval --quick --out /tmp/smoke     # smoke test: tiny benchmark, fast fits; numbers mean nothing
  scanagent eval --data anomaly-shapenet:dev-bench --classes flange,gear --methods pointmae-bank
      --backends policy
  (`python -m evals.run ...` is the same command)

exit codes: 0 ok, 1 some results failed (see the table's failed column), 2 bad input,
  130 interrupted (rerun resumes)"""
QUICK_NOTE = (
    "--quick is a smoke test: a tiny benchmark and a detector trained for a few steps, so its numbers say "
    "the pipeline runs end to end, not how well anything detects"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evals.run",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", help="<layout>:<root>, e.g. anomaly-shapenet:data/dev-bench (not needed with --quick)"
    )
    p.add_argument("--classes", type=_csv, help="comma-separated classes (default: all)")
    p.add_argument(
        "--methods",
        type=_csv,
        help="comma-separated: pointmae-bank,btf,recon,random (default: these "
        "four when --backends is not given), oracle-regions (the top "
        "--max-verify-fraction of the full bank's points under the "
        "verifier's prior: a diagnostic for the agents' budget)",
    )
    p.add_argument(
        "--backends",
        type=_csv,
        default=[],
        help="comma-separated: policy, random-regions, ranker:model=FILE, hf[:model], hf:adapter=DIR|none, "
        "openai:<model>, langchain:<module:Class>; options after the colon as key=value;key=value, "
        "guidance=TEXT for a guided row and label=NAME for its name (e.g. "
        "'policy:guidance=sharp ridges are normal;label=policy+ridges')",
    )
    p.add_argument("--out", default="eval-out", help="output folder (a rerun into it resumes)")
    p.add_argument(
        "--limit", type=int, help="at most N test scans per class (defective and normal alternating)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny dev benchmark under <out>/quick-bench and a fast detector config (smoke test, CI)",
    )
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", help="Ray cluster address (default: a local Ray with 2 CPUs)")
    p.add_argument(
        "--base-url", help="OpenAI-compatible server for the openai backend, e.g. http://127.0.0.1:8000/v1"
    )
    p.add_argument(
        "--backend-kwargs",
        default="{}",
        help="JSON object of extra arguments for the openai and langchain backends, e.g. "
        "'{\"llama_cpp_compat\": true}'",
    )
    p.add_argument(
        "--price-per-1k-prompt", type=float, help="cost per 1000 prompt tokens (for the cost column)"
    )
    p.add_argument("--price-per-1k-completion", type=float, help="cost per 1000 completion tokens")
    p.add_argument(
        "--train-steps", type=int, help="Point-MAE training steps per class (default: the detector's)"
    )
    p.add_argument(
        "--max-verify-fraction", type=float, default=0.2, help="share of points the bank may score"
    )
    p.add_argument(
        "--context-window",
        type=context_window_arg,
        help="the LLM's context window in tokens (e.g. a llama.cpp server's "
        "--n_ctx): agents are asked to report before a request would not fit",
    )
    p.add_argument(
        "--max-seconds",
        type=seconds_arg,
        default=DEFAULT_MAX_SECONDS,
        help="a backend's wall time per scan, every request and retry included; past it the policy "
        "finishes the scan (or, with --no-fallback, the scan fails) and the result says why "
        "(default %(default)g)",
    )
    p.add_argument(
        "--no-fallback",
        action="store_true",
        help="record a backend failure as failed instead of letting the policy finish the scan",
    )
    p.add_argument("--no-transcripts", action="store_true", help="do not write per-scan agent transcripts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init",
        type=Path,
        help="pretrained Point-MAE backbone folder (python -m tools.pointmae_train) the Point-MAE class "
        "fits start from (FPFH fits need none)",
    )
    p.add_argument(
        "--register",
        action="store_true",
        help="fit every class with registration to its first template + a coordinate bank (scans that "
        "are not pre-aligned)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show third-party progress bars and warnings")
    return p


def make_config(args: argparse.Namespace):
    """The HarnessConfig for parsed arguments (raises HarnessError/ValueError on bad combinations)."""
    from agent.loop import AgentBudget
    from agent.pipeline import InspectionConfig
    from detector.config import DetectorConfig
    from evals.harness import (
        DEFAULT_METHODS,
        HarnessConfig,
        HarnessError,
        ensure_quick_bench,
        parse_backend,
        quick_detector_config,
    )

    out = Path(args.out)
    if args.quick:
        data = args.data or ensure_quick_bench(out, seed=args.seed)
        detector = quick_detector_config(seed=args.seed)
    elif args.data:
        data, detector = args.data, DetectorConfig(seed=args.seed)
    else:
        raise HarnessError("--data <layout>:<root> is required (or --quick)")
    if args.train_steps is not None:
        detector = replace(detector, train_steps=args.train_steps)
    if args.register:
        detector = replace(detector, register=True)
    if args.base_url and not any(b.split(":")[0] == "openai" for b in args.backends):
        raise HarnessError("--base-url is for the openai backend; add --backends openai:<model>")
    methods = args.methods if args.methods is not None else ([] if args.backends else list(DEFAULT_METHODS))
    try:
        llm_kwargs = json.loads(args.backend_kwargs)
    except json.JSONDecodeError as exc:
        raise HarnessError(f"--backend-kwargs is not JSON: {exc}") from exc
    if not isinstance(llm_kwargs, dict):
        raise HarnessError("--backend-kwargs must be a JSON object")
    backends = tuple(
        parse_backend(b, base_url=args.base_url, seed=args.seed, llm_kwargs=llm_kwargs) for b in args.backends
    )
    return HarnessConfig(
        data=data,
        out=out,
        classes=tuple(args.classes) if args.classes else None,
        methods=tuple(methods),
        backends=backends,
        limit=args.limit,
        detector=detector,
        init_backbone=args.init,
        inspection=InspectionConfig(
            max_verify_fraction=args.max_verify_fraction,
            seed=args.seed,
            budget=AgentBudget(max_context_tokens=args.context_window, max_seconds=args.max_seconds),
        ),
        executor=args.executor,
        ray_address=args.ray_address,
        price_prompt=args.price_per_1k_prompt,
        price_completion=args.price_per_1k_completion,
        fallback=not args.no_fallback,
        transcripts=not args.no_transcripts,
        seed=args.seed,
        command="python -m evals.run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    quiet_third_party(verbose=args.verbose)
    console = Console(stderr=True)
    return run_cli(lambda: _run(args, console), console_say(console))


def _run(args: argparse.Namespace, console: Console) -> int:
    """The harness run behind progress bars; bad input ends it through agent.cli_args (exit 2)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from detector.config import FitError
    from evals.harness import HarnessError, run_harness
    from scans.datasets import DatasetError

    with exits_on(((HarnessError, DatasetError, ValueError, FileExistsError), "bad input", EXIT_BAD_INPUT)):
        config = make_config(args)
    tasks: dict[str, int] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=False,
    ) as bars:

        def progress(stage: str, done: int, total: int, detail: str) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total, detail="")
            bars.update(tasks[stage], completed=done, total=total, detail=detail[:60])

        try:
            with exits_on(((HarnessError, DatasetError, FitError), "bad input", EXIT_BAD_INPUT)):
                outcome = run_harness(config, progress=progress)
        except KeyboardInterrupt:
            console.print(
                f"[yellow]interrupted[/yellow]: finished results are in {config.out / 'results.jsonl'}; "
                "rerun the same command to resume"
            )
            return EXIT_INTERRUPTED
    out = config.out
    print(
        f"ran {outcome.ran} (name x scan) results, skipped {outcome.skipped} already done, "
        f"{outcome.failed} failed, in {outcome.seconds:.1f} s"
    )
    print((out / "table.md").read_text())
    if args.quick:
        print(f"note: {QUICK_NOTE}")
    print(
        f"written: {out / 'summary.json'}, {out / 'summary.csv'}, {out / 'table.md'}, {out / 'report.html'}"
    )
    return EXIT_FAILURES if outcome.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
