"""What the command lines share (`agent.run`, `agent.fit`, `agent.tune`, `evals.run`): argument types, exit
codes, and the one place an error becomes a message and an exit code, so every command refuses bad input the
same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

EXIT_OK, EXIT_FAILURES, EXIT_BAD_INPUT, EXIT_BACKEND, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

MIN_CONTEXT_WINDOW = 256
# A backend's wall time per scan (AgentBudget.max_seconds): several times what a small local model takes on a
# 2-core machine, far below what a hung server would cost under the openai SDK's timeout and retries.
DEFAULT_MAX_SECONDS = 600.0


def seconds_arg(text: str) -> float:
    """--max-seconds: a positive, finite number of seconds (argparse turns the error into exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def context_window_arg(text: str) -> int:
    """--context-window: an int of at least MIN_CONTEXT_WINDOW tokens (argparse makes the error exit 2)."""
    value = positive_int(text)
    if value < MIN_CONTEXT_WINDOW:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_CONTEXT_WINDOW} tokens, got {value}")
    return value


def positive_int(text: str) -> int:
    """An int of at least 1 (argparse turns the error into exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ------------------------------------------------------------------------------------ errors -> exit codes
ErrorRule = tuple[type[Exception] | tuple[type[Exception], ...], str, int]  # (error types, label, exit code)
Say = Callable[[str, str], None]  # say(label, message): how a command shows a failure


class CliExit(Exception):
    """Ends a command: `label: message` is shown once, by `run_cli`, and `code` is the exit code. Raised where
    the problem is known, so the code that finds a bad input does not also print and return."""

    def __init__(self, label: str, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(f"{label}: {message}")
        self.label, self.message, self.code = label, message, code


@contextmanager
def exits_on(*rules: ErrorRule) -> Iterator[None]:
    """Within the block, an error of a rule's types becomes that rule's CliExit (first matching rule wins);
    any other error passes through unchanged."""
    try:
        yield
    except CliExit:
        raise
    except Exception as error:
        for kinds, label, code in rules:
            if isinstance(error, kinds):
                raise CliExit(label, str(error), code) from error
        raise


def run_cli(work: Callable[[], int], say: Say, rules: Sequence[ErrorRule] = ()) -> int:
    """`work()`'s exit code; on a CliExit (or an error matching `rules`): `say(label, message)`, its code."""
    try:
        with exits_on(*rules):
            return work()
    except CliExit as stop:
        say(stop.label, stop.message)
        return stop.code


def console_say(console: Console) -> Say:
    """Failures on a rich console: the label in red, the message as plain text (paths and brackets kept)."""

    def say(label: str, message: str) -> None:
        console.print(f"[red]{label}:[/red] {escape(message)}", highlight=False, soft_wrap=True)

    return say


def stderr_say(label: str, message: str) -> None:
    """Failures as plain `label: message` lines on stderr (commands without a rich console)."""
    print(f"{label}: {message}", file=sys.stderr)
