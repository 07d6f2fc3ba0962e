"""The one progress-callback type: every long stage (fitting, feature views, scan jobs, reports) reports
through it.

A callback gets the stage's name, how much of it is done out of how much, and an optional detail (which scan,
which
sub-stage), so a CLI can drive one progress display from fitting and evaluation alike.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None: ...
