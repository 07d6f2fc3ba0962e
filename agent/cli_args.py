"""Argument types the command lines share (`agent.run`, `evals.run`), so both refuse bad values the same way."""

from __future__ import annotations

import argparse

MIN_CONTEXT_WINDOW = 256


def context_window_arg(text: str) -> int:
    """--context-window: an int of at least MIN_CONTEXT_WINDOW tokens (argparse turns the error into exit 2)."""
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
