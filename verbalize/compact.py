"""A compact scan overview for small local models: only the patches with the highest cue, in short columns.

Why: the full overview (every patch, every statistic's mean and max, a legend) costs 1-3k tokens; a 135M
model reads it slowly, trains on it slowly (a step's cost grows with the prompt), and cannot make use of most
of it. The compact overview keeps what a reader needs to name a region: the `rows` patches with the highest
cue, highest first, their centre, the three geometric z-scores, the max
z-score of each learned statistic that varies on this scan, and the cue. A statistic whose shown z-scores are
all 0 (a constant statistic, as the floor of `robust_z` makes it) carries no evidence and is left out. Column
names are the full table's, so `agent.backends.ranker` parses both formats with one reader.

Rows come highest cue first (the full table is in id order): a small model reads a ranked list as the policy
reads `list_patches(sort_by="cue")`, and what it has to learn is where the defect ends and what guidance
changes, not how to sort eight numbers.

The patching does not change: the number of patches still comes from the configured token budget, so the
compact and the full overview of one scan name the same patches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scans.patches import PatchTable
from verbalize.render import (
    CLOSE_MARKER,
    GUIDANCE_SHARE,
    OPEN_MARKER,
    TokenCounter,
    _fmt,
    _sanitise_guidance,
    environment,
    estimate_tokens,
)

COMPACT_ROWS = 8  # patches shown by default; the rest are summarised by their largest cue
COMPACT_TOKEN_BUDGET = 512  # budget (estimate_tokens) of a COMPACT_ROWS overview without guidance
COMPACT_ROW_TOKENS = 48  # budget added per row beyond COMPACT_ROWS (a row of 13 columns is ~35-40)
GEOMETRY_COLUMNS = ("z_curvature", "z_roughness", "z_spacing")


def compact_columns(table: PatchTable, rows: list[int]) -> list[str]:
    """The columns shown for `rows`: centre, geometric z-scores, each varying statistic's max z-score, cue."""
    stats = []
    for stat in table.stat_names:
        name = f"z_{stat}_max"
        if any(_fmt(table.columns[name][i], 1) != "0.0" for i in rows):
            stats.append(name)
    return ["x", "y", "z", *GEOMETRY_COLUMNS, *stats, "cue"]


def compact_token_budget(rows: int) -> int:
    """The overview budget for `rows` rows: rows are dropped only when a wide table (many varying
    statistics) would not fit."""
    return COMPACT_TOKEN_BUDGET + COMPACT_ROW_TOKENS * max(0, rows - COMPACT_ROWS)


def render_compact_overview(
    table: PatchTable,
    guidance: str | None = None,
    rows: int = COMPACT_ROWS,
    token_budget: int | None = None,
    *,
    templates: str | Path | None = None,
    count_tokens: TokenCounter | None = None,
) -> str:
    """The compact overview (module docstring): at most `rows` patches, fewer if the text would exceed
    `token_budget` (default `compact_token_budget(rows)`); the guidance has its own share of the budget on
    top, as in the full overview."""
    if rows < 1:
        raise ValueError(f"a compact overview needs at least one row, got {rows}")
    token_budget = compact_token_budget(rows) if token_budget is None else token_budget
    count = count_tokens or estimate_tokens
    template = environment(templates).get_template("overview_compact.j2")
    cue = table.columns["cue"]
    by_cue = sorted(range(table.n_patches), key=lambda i: (-cue[i], i))
    clean_guidance = None
    if guidance is not None:
        clean_guidance = _sanitise_guidance(guidance, int(token_budget * GUIDANCE_SHARE), count)

    def render(keep: int, with_guidance: bool) -> str:
        kept = by_cue[:keep]
        rest = by_cue[keep:]
        cols = compact_columns(table, kept)
        decimals = {c: (1 if c in "xyz" or c.startswith("z_") else 2) for c in cols}
        shown = [
            [str(int(table.ids[i])), *(_fmt(table.columns[c][i], decimals[c]) for c in cols)] for i in kept
        ]
        text = template.render(
            n_points=table.normalisation.n_points,
            n_patches=table.n_patches,
            stat_names=list(table.stat_names),
            header=["id", *cols],
            rows=shown,
            omitted={"count": len(rest), "cue_max": _fmt(np.max(cue[rest]), 2)} if rest else None,
            guidance=clean_guidance if with_guidance else None,
            open_marker=OPEN_MARKER,
            close_marker=CLOSE_MARKER,
        )
        return text.strip() + "\n"

    keep = min(rows, table.n_patches)
    while keep > 1 and count(render(keep, False)) > token_budget:
        keep -= 1
    if count(render(keep, False)) > token_budget:
        raise ValueError(f"token budget {token_budget} is too small for a compact overview with one patch")
    return render(keep, True)


def render_compact_system(*, templates: str | Path | None = None) -> str:
    """The compact system prompt (the task and how to read the numbers; the backend lists the tools)."""
    return environment(templates).get_template("system_compact.j2").render().strip() + "\n"
