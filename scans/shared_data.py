"""Where the project's shared, read-only data lives: `../shared/` beside the checkout, or `$SCANAGENT_SHARED`.

Tests and the benchmark builder read real scans from there and skip (with a reason) when it is absent; the
project
never copies it into its own tree.
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_root() -> Path:
    """`$SCANAGENT_SHARED` when set, else the `shared` folder next to this checkout."""
    env = os.environ.get("SCANAGENT_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared"


def shared_scans_dir() -> Path:
    """The real scans folder (may not exist; callers check)."""
    return shared_root() / "data" / "scans"
