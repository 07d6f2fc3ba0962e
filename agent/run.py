"""`python -m agent.run scan.ply [more scans | a folder] [--bank DIR] [--backend ...] [--out DIR]`.

Inspects scans with an agent and the memory bank and writes one output folder per scan (see agent.report); a
run over a folder or several scans also writes `index.html` in --out, linking each scan's viewer. The model
and the bank load once for all scans. Exit codes: 0 ok, 2 bad input (unreadable scan, bad bank folder, bad
flags), 3 backend unavailable. `--demo` builds a demo part with a defect, fits it, and inspects it: offline,
no key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jinja2
from rich.console import Console

from agent.cli_args import (
    DEFAULT_MAX_SECONDS,
    EXIT_BACKEND,
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    CliExit,
    console_say,
    context_window_arg,
    exits_on,
    positive_int,
    run_cli,
    seconds_arg,
)
from agent.quiet import quiet_third_party
from agent.sampled import MAX_ANALYSIS_POINTS
from agent.secrets import RedactedStream, Redactor, redacted_logging, secrets_in

EPILOG = """examples:
  scanagent run scans/part_017.ply --bank banks/bracket --out runs/     # one scan, policy agent
  scanagent run scans/ --bank banks/bracket                             # a folder: summary.csv/.json in --out
  scanagent run scan.ply --bank banks/bracket --backend hf -v           # local SmolLM2, its progress bars
  scanagent run scan.ply --bank banks/bracket --backend hf --adapter none  # SmolLM2, no tuned adapter
  scanagent run --demo                                                  # offline demo, no key
  (`python -m agent.run ...` is the same command)

exit codes: 0 ok, 2 bad input (unreadable scan, bad bank folder, bad flags), 3 backend unavailable,
  130 interrupted
environment: SCANAGENT_CACHE (default ~/.cache/scanagent) holds the hf backend's dequantised model copy"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agent.run",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scans", nargs="*", help="scan files or folders of scans")
    p.add_argument(
        "--bank", help="fitted class folder from `python -m agent.fit` (omit for the zero-shot mode)"
    )
    p.add_argument("--backend", default="policy", choices=["policy", "hf", "openai", "langchain"])
    p.add_argument(
        "--model",
        help="hf: model dir, cached id or .gguf (default: packaged SmolLM2); openai: model name; "
        "langchain: module:Class",
    )
    p.add_argument(
        "--adapter",
        help="hf: a tuned adapter folder (python -m agent.tune train), or none for the base model "
        "(default: the adapter shipped with the package)",
    )
    p.add_argument("--base-url", help="openai: an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--backend-kwargs", default="{}", help="JSON object of extra backend arguments")
    p.add_argument("--guidance", help="your text guidance for the agent, e.g. 'sharp ridges are normal'")
    p.add_argument(
        "--normal-features",
        default="shipped",
        help="what applies guidance that calls a feature normal: the shipped learned recognisers (default), "
        "none (the backend alone), or your own file (python -m agent.tune train --method recogniser)",
    )
    p.add_argument(
        "--verify",
        choices=["suspects", "all"],
        default="suspects",
        help="suspects: the bank scores only the agent's regions; all: every point (full-bank baseline)",
    )
    p.add_argument(
        "--max-verify-fraction", type=float, default=0.2, help="share of points the bank may score"
    )
    p.add_argument("--templates", help="folder of .j2 templates overriding prompts/ by file name")
    p.add_argument(
        "--max-turns",
        type=positive_int,
        default=8,
        help="most model replies per scan before the agent must report (default 8)",
    )
    p.add_argument(
        "--max-tool-calls",
        type=positive_int,
        default=16,
        help="most tool calls per scan, over all turns (default 16)",
    )
    p.add_argument(
        "--context-window",
        type=context_window_arg,
        help="the LLM's context window in tokens (e.g. a llama.cpp server's "
        "--n_ctx): the agent is asked to report before a request would not fit",
    )
    p.add_argument(
        "--max-seconds",
        type=seconds_arg,
        default=DEFAULT_MAX_SECONDS,
        help="the backend's wall time per scan, every request and retry included; past it the policy "
        "finishes the scan and the report says so (default %(default)g)",
    )
    p.add_argument("--out", default="runs", help="output root; one folder per scan")
    p.add_argument("--mesh-points", type=int, default=30000, help="points sampled from mesh inputs")
    p.add_argument(
        "--max-analysis-points",
        type=positive_int,
        default=MAX_ANALYSIS_POINTS,
        help="larger scans are analysed on a seeded sample of this many points; every input point "
        "still gets a score (its nearest analysed point's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-render", action="store_true", help="skip the pictures (regions.png and viewer.html)")
    p.add_argument("--demo", action="store_true", help="build, fit and inspect a demo part with a defect")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show third-party progress bars and warnings, and every scan's regions table",
    )
    return p


def _expand(paths: list[str]) -> list[Path]:
    """Scan files as given, and the scans inside given folders (label files beside them are not scans)."""
    from scans.io import is_scan_file

    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.is_file() and is_scan_file(p)))
        else:
            out.append(path)
    return out


def backend_kwargs(args: argparse.Namespace) -> dict:
    """--backend-kwargs as a dict (ValueError/TypeError on bad JSON or another JSON value)."""
    kwargs = json.loads(args.backend_kwargs)
    if not isinstance(kwargs, dict):
        raise TypeError("--backend-kwargs must be a JSON object")
    return kwargs


def make_backend(args: argparse.Namespace):
    """The chosen backend, constructed once for every scan."""
    from agent.backends import get_backend

    kwargs = backend_kwargs(args)
    if args.model:  # langchain: the chat model class (module:Class); the others: the model's name
        kwargs.setdefault("chat_model" if args.backend == "langchain" else "model", args.model)
    if args.adapter is not None:
        if args.backend != "hf":
            raise ValueError("--adapter is for --backend hf")
        if args.adapter != "none":  # a folder that is not a whole adapter is bad input, named
            from agent.backends.base import BackendUnavailable
            from agent.backends.hf_adapter import check_adapter_dir

            try:
                check_adapter_dir(Path(args.adapter))
            except BackendUnavailable as exc:
                raise ValueError(f"--adapter {args.adapter}: {exc}") from None
        kwargs.setdefault("adapter", args.adapter)
    if args.base_url:
        if args.backend != "openai":
            raise ValueError("--base-url is for --backend openai")
        kwargs.setdefault("base_url", args.base_url)
    return get_backend(args.backend, **kwargs)


def _unique_dir(root: Path, stem: str, taken: set[str]) -> Path:
    name, i = stem, 1
    while name in taken:
        i += 1
        name = f"{stem}-{i}"
    taken.add(name)
    return root / name


def run(args: argparse.Namespace, console: Console) -> int:
    from scans.staging import OutputError, check_writable
    from verbalize import TemplateFolderError, check_templates

    out_root = Path(args.out)
    started = time.perf_counter()

    def work() -> int:
        # before any work: a run that cannot write its outputs, or render its prompts, should not start
        with exits_on(((TemplateFolderError, OutputError), "bad option", EXIT_BAD_INPUT)):
            if args.templates is not None:
                check_templates(args.templates)
            check_writable(out_root, "--out folder")
        root_existed = out_root.exists()
        try:
            return _run_checked(args, console, out_root, started)
        finally:
            _remove_if_empty(out_root, root_existed)

    return run_cli(work, console_say(console))


def _remove_if_empty(folder: Path, existed: bool) -> None:
    """A run that wrote nothing leaves no empty --out folder behind (one that was there before stays)."""
    if not existed:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (outputs were written), or not there


def _run_checked(args: argparse.Namespace, console: Console, out_root: Path, started: float) -> int:
    """The run once its --out and --templates are known to be usable."""
    from agent.backends import BackendUnavailable
    from agent.loop import AgentBudget
    from agent.pipeline import ClassMismatch, InspectionConfig, check_scan_fits_class, inspect_scan
    from agent.report import print_summary, staged_dir, write_outputs
    from agent.sampled import analysis_rows
    from agent.summary import ScanRow, print_run_summary, write_run_summary
    from detector.config import FitError
    from detector.fitted import FittedClass
    from detector.registration import RegistrationError
    from scans.io import MIN_POINTS, ScanError, read_scan
    from scans.staging import OutputError
    from verbalize import template_error_message

    if args.demo:
        from agent.demo import prepare_demo  # the demo borrows the benchmark's part and defect makers

        console.print(
            "[bold]demo[/bold]: building a pipe elbow with a dent and fitting its class (memory bank)..."
        )
        scan_paths, bank_dir = prepare_demo(out_root / "demo-data", seed=args.seed, console=console)
        console.print(f"  built and fitted in {time.perf_counter() - started:.1f} s")
        args.scans, args.bank = [str(p) for p in scan_paths], str(bank_dir)
    scans = _expand(args.scans)
    if not scans:
        console.print("[red]no scans given[/red] (pass scan files or folders of scans, or --demo)")
        return EXIT_BAD_INPUT
    if not 0.0 < args.max_verify_fraction <= 1.0:
        raise CliExit(
            "bad option", f"--max-verify-fraction must be in (0, 1], got {args.max_verify_fraction}"
        )
    if args.verify == "all" and not args.bank:
        raise CliExit("bad option", "--verify all scores every point with a memory bank: give --bank DIR")
    fitted = None
    if args.bank:
        with exits_on(((FitError, OSError, ValueError), "bad bank", EXIT_BAD_INPUT)):
            fitted = FittedClass.load(args.bank)
    with exits_on(
        (BackendUnavailable, "backend unavailable", EXIT_BACKEND),
        # bad JSON, unknown keyword arguments, wrong flag combination
        ((ValueError, TypeError), "bad backend options", EXIT_BAD_INPUT),
    ):
        backend = make_backend(args)
    with exits_on((ValueError, "bad --normal-features", EXIT_BAD_INPUT)):
        if args.guidance and args.normal_features != "none":  # a bad file is named before any scan runs
            from agent.normal_features import recognisers_for

            recognisers_for(args.normal_features)
    config = InspectionConfig(
        verify=args.verify,
        max_verify_fraction=args.max_verify_fraction,
        guidance=args.guidance,
        normal_features=args.normal_features,
        templates=args.templates,
        seed=args.seed,
        budget=AgentBudget(
            max_turns=args.max_turns,
            max_tool_calls=args.max_tool_calls,
            max_context_tokens=args.context_window,
            max_seconds=args.max_seconds,
        ),
    )
    if fitted is None:
        console.print(
            "[yellow]no --bank: zero-shot mode[/yellow] (suspects compared with the scan's own far patches)"
        )
    # the detector patches the scan into groups: fewer points than a few groups is not a scan it can judge
    min_points = max(MIN_POINTS, 4 * fitted.config.backbone.group_size) if fitted is not None else MIN_POINTS
    status, taken, written = EXIT_OK, set(), 0
    rows: list[ScanRow] = []
    several = len(scans) > 1
    say = console_say(console)
    for path in scans:
        try:
            scan = read_scan(path, mesh_points=args.mesh_points, min_points=min_points, seed=args.seed)
            if fitted is not None:
                check_scan_fits_class(scan.points, fitted, str(path), bank_dir=str(args.bank))
        except (ScanError, ClassMismatch) as exc:
            say("bad scan", str(exc))
            rows.append(ScanRow.failed(str(path), str(exc)))
            status = EXIT_BAD_INPUT
            continue
        out_dir = _unique_dir(out_root, path.stem, taken)
        try:
            with staged_dir(out_dir) as staging:
                analysed = analysis_rows(len(scan.points), args.max_analysis_points, seed=args.seed)
                if analysed is not None:
                    console.print(
                        f"  {path}: {len(scan.points)} points; analysing a sample of {len(analysed)}"
                    )
                inspection = inspect_scan(
                    scan.points if analysed is None else scan.points[analysed],
                    fitted,
                    backend,
                    config=config,
                    transcript_path=staging / "transcript.jsonl",
                )
                write_outputs(
                    inspection,
                    staging,
                    source=str(path),
                    render=not args.no_render,
                    scan=scan,
                    analysed_rows=analysed,
                    seed=args.seed,
                )
        except RegistrationError as exc:  # a registered class cannot align it: nothing is written
            say("bad scan", f"{path}: {exc}")
            rows.append(ScanRow.failed(str(path), f"{path}: {exc}"))
            status = EXIT_BAD_INPUT
            continue
        except OutputError as exc:  # checked before the scan is scored; the other scans go on
            say("bad output", f"{path}: {exc}")
            rows.append(ScanRow.failed(str(path), f"{path}: {exc}"))
            status = EXIT_BAD_INPUT
            continue
        except jinja2.TemplateError as exc:  # a user template failing at render time fails every scan alike
            raise CliExit(
                "bad option", f"--templates: {template_error_message(exc, args.templates)}"
            ) from exc
        except OSError as exc:  # e.g. the disk filled up: nothing half-written was left for this scan
            say("output failed", f"{path}: {out_dir}: {exc}")
            rows.append(ScanRow.failed(str(path), f"{path}: {out_dir}: {exc}"))
            status = EXIT_BAD_INPUT
            continue
        written += 1
        print_summary(inspection, str(path), console, regions_table=args.verbose or not several)
        console.print(
            f"  outputs: {out_dir}" + ("" if args.no_render else f"  (open {out_dir / 'viewer.html'})")
        )
        rows.append(ScanRow.from_report(inspection.report(), str(path), str(out_dir)))
        if args.demo:
            _print_demo_check(inspection, path, console)
    if several:
        print_run_summary(rows, console)
        csv_path, json_path = write_run_summary(rows, out_root)
        console.print(f"  summary: {csv_path}, {json_path}")
    if written and (several or any(Path(raw).is_dir() for raw in args.scans)):
        from agent.viewer import write_index

        index = write_index(out_root)
        console.print(
            f"index of every scan in {out_root}: {index}"
            if index
            else f"[yellow]no index written:[/yellow] {out_root / 'index.html'} is not scanagent's; left "
            "alone"
        )
    if args.demo:
        console.print(f"demo done in {time.perf_counter() - started:.1f} s")
    return status


def _print_demo_check(inspection, path: Path, console: Console) -> None:
    """The demo knows where its dent is: say whether the agent's regions found it."""
    from agent.demo import check_against_ground_truth, ground_truth_for

    truth = ground_truth_for(path)
    if truth is None:
        return
    check = check_against_ground_truth(
        inspection.flagged_regions(), [r.verdict for r in inspection.verification.regions], truth
    )
    colour = "green" if check.found else "red"
    console.print(f"  [{colour}]{check.summary()}[/{colour}]")


def run_redactor(args: argparse.Namespace) -> Redactor:
    """The run's secrets: credential-looking environment values and --backend-kwargs values (api_key,
    headers)."""
    try:
        given = secrets_in(backend_kwargs(args))
    except (ValueError, TypeError):  # bad JSON is reported by run(); it holds no usable secret to look for
        given = []
    return Redactor.for_run(given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    redact = run_redactor(args)
    # everything the run prints or logs passes the redactor (a server's error may echo the key it was sent);
    # paths in messages stay whole (soft wrap: copyable, greppable)
    console = Console(soft_wrap=True, file=RedactedStream(sys.stdout, redact.text))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_third_party(verbose=args.verbose)  # before torch/transformers/tqdm are imported
    with redacted_logging(redact):
        try:
            return run(args, console)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
