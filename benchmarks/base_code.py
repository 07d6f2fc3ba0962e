"""The base commit's code beside the current one: benchmarks print current / base ratios in one run."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def base_revision(rev: str | None) -> str:
    """``rev``, or by default where this branch left main (``git merge-base HEAD main``)."""
    return rev or _git("merge-base", "HEAD", "main")


def head_revision() -> str:
    return _git("rev-parse", "HEAD")


@contextmanager
def base_worktree(rev: str, where: Path) -> Iterator[Path]:
    """A detached git worktree of ``rev`` at ``where`` for the block's duration, removed after it."""
    _git("worktree", "add", "--detach", str(where), rev)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)
