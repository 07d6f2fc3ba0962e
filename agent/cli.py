"""`scanagent <command> ...`: one console script for the project's commands, beside their `python -m` forms.

Each command is the existing module's `main(argv)` (same flags, same outputs, same exit codes), imported only when it
is chosen so that `scanagent --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("agent.fit", "fit a class on normal scans (Point-MAE + memory bank + thresholds)"),
    "run": ("agent.run", "inspect scans with the agent and the memory bank; a verdict per scan"),
    "eval": ("evals.run", "evaluate methods and backends on a dataset (tables, plots, report.html)"),
    "bench": ("evals.bench", "build the dev benchmark (procedural parts + real scans)"),
    "datasets": ("evals.datasets", "summarise a dataset layout per class"),
}

USAGE = "usage: scanagent {" + ",".join(COMMANDS) + "} [options]   (scanagent <command> --help for its options)"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<{width}}  {what}  (= python -m {module})" for name, (module, what) in COMMANDS.items()]
    lines += ["", ("exit codes: 0 ok, 2 bad input, 3 backend unavailable (run), 1 some results failed (eval) "
                   "or problems found (datasets), 130 interrupted")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_help())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"scanagent: unknown command {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as stop:  # argparse's --help (0) and usage errors (2)
        return stop.code if isinstance(stop.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
