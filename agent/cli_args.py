"""Argument types the command lines share (`agent.run`, `evals.run`), so both refuse bad values the same
way."""

from __future__ import annotations

import argparse

MIN_CONTEXT_WINDOW = 256
# A backend's wall time per scan (AgentBudget.max_seconds): several times what a small local model takes on a
# 2-core
# machine, far below what a hung server would cost under the openai SDK's timeout and retries.
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
    """--context-window: an int of at least MIN_CONTEXT_WINDOW tokens (argparse turns the error into exit
    2)."""
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
