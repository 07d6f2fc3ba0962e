"""The heat map's colour table, read from a small file shipped beside this module instead of from matplotlib.

Why: importing matplotlib is a noticeable part of a cold `agent.run`, and scores.ply, regions.png and
viewer.html need nothing of it but 256 colours. The file holds matplotlib's "inferno" at 256 levels;
tests/test_colours.py checks it against matplotlib, so the two cannot drift apart.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np

HEAT_CMAP = "inferno"  # the anomaly-score colour map of scores.ply, regions.png and viewer.html
HEAT_TABLE_FILE = "inferno.json"


@lru_cache(maxsize=1)
def _heat_rows() -> tuple[tuple[int, int, int], ...]:
    document = json.loads(resources.files("scans").joinpath(HEAT_TABLE_FILE).read_text(encoding="utf-8"))
    rows = tuple(tuple(int(c) for c in row) for row in document["rgb"])
    if document.get("name") != HEAT_CMAP or len(rows) != 256 or any(len(r) != 3 for r in rows):
        raise RuntimeError(f"scans/{HEAT_TABLE_FILE}: not a 256-entry {HEAT_CMAP} table; reinstall scanagent")
    return rows


def heat_table() -> np.ndarray:
    """uint8 (256, 3): the heat map's RGB colours from low to high."""
    return np.array(_heat_rows(), dtype=np.uint8)


def heat_levels(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 (N,) each value's row of :func:`heat_table` (low -> 0, high -> 255; all 0 when high <= low)."""
    values = np.asarray(values, dtype=np.float64)
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
