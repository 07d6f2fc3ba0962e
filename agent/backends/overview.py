"""The scan overview's patch table read back out of the conversation, for the backends that read numbers.

Why: the policy and the learned ranker see only the messages, as a model does; the overview message is where
the per-patch statistics (the z-score columns) stand, so they read them there instead of asking a tool for
each patch.
"""

from __future__ import annotations

import math
import re

_POINTS_RE = re.compile(r"^Points: (\d+)\.", re.MULTILINE)


def _table_rows(text: str) -> list[tuple[dict[str, float], str]]:
    """Each row of the overview's patch table: (column -> value, the row's line as shown)."""
    lines = text.splitlines()
    rows: list[tuple[dict[str, float], str]] = []
    for n, line in enumerate(lines):
        header = line.split()
        if header[:1] != ["id"] or "cue" not in header:
            continue
        for row_line in lines[n + 1 :]:
            values = row_line.split()
            if len(values) != len(header):
                break
            try:
                rows.append(({name: float(v) for name, v in zip(header, values)}, " ".join(values)))
            except ValueError:
                break
        break
    return rows


def parse_overview_table(text: str) -> tuple[list[dict[str, float]], int | None]:
    """The rows of the overview's patch table (column -> value, `id` included) and the scan's point count."""
    match = _POINTS_RE.search(text)
    return [row for row, _ in _table_rows(text)], int(match.group(1)) if match else None


def table_lines(text: str) -> dict[int, str]:
    """Each shown patch's row of the overview's table as text, by patch id (what a row question quotes)."""
    return {int(row["id"]): line for row, line in _table_rows(text)}


def overview_text(messages: list[dict]) -> str:
    """The first user message that holds a patch table (the scan overview)."""
    for m in messages:
        if m.get("role") == "user" and "## Patch table" in (m.get("content") or ""):
            return m["content"]
    return ""


def row_reason(row: dict[str, float], terms: int = 2) -> str:
    """A patch row's largest positive z-scores in words ("z_curvature=4.1, z_recon=3.0"), else its cue."""
    zs = sorted(((k, v) for k, v in row.items() if k.startswith("z_")), key=lambda kv: (-kv[1], kv[0]))
    zs = zs[:terms]
    return ", ".join(f"{k}={v:.1f}" for k, v in zs if v > 0) or f"cue={row.get('cue', 0.0):.2f}"


def select_rows(
    ranked: list[tuple[int, float, dict[str, float]]],
    threshold: float,
    limit: int,
    target_share: float,
    total_points: int | None,
) -> list[tuple[int, float, dict[str, float]]]:
    """The leading rows of `ranked` (id, score, row; best first) scoring at least `threshold`: at most `limit`
    of them, and after the first only while their points stay within `target_share` of the scan."""
    chosen: list[tuple[int, float, dict[str, float]]] = []
    used = 0.0
    for pid, score, row in ranked:
        if score < threshold or len(chosen) >= limit:
            break
        size = row.get("n_points", 0.0)
        if chosen and total_points and used + size > target_share * total_points:
            break
        used += size
        chosen.append((pid, score, row))
    return chosen


# A learned reader's training records two thresholds on its training rows: the best F1 ("f1") and the best F2
# ("recall", recall weighted twice). "recall" is the default where it is recorded: what a reader names is
# verified by the memory bank, so a defect it leaves out is lost for good while a false region costs only
# verified points (README, "Recall at the same verified share"). Files trained before it was recorded keep f1.
OPERATING_POINTS = ("recall", "f1")


def operating_threshold(option: object, f1: float, recall: float | None, source: str) -> tuple[float, str]:
    """(threshold, what it is) for a reader's `option`: None (recall where recorded, else f1), "f1",
    "recall" or a number. ValueError naming `source` for anything else, or when a recorded threshold is not
    finite."""
    if not all(math.isfinite(v) for v in (f1, *([] if recall is None else [recall]))):
        raise ValueError(f"{source}: a recorded threshold is not a finite number")
    if option is None:
        return (recall, "recall") if recall is not None else (f1, "f1")
    if option == "f1":
        return f1, "f1"
    if option == "recall":  # OPERATING_POINTS names these two
        if recall is None:
            raise ValueError(f"{source} records no recall threshold (trained before it was recorded): use f1")
        return recall, "recall"
    try:
        value = float(option)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        named = " or ".join(OPERATING_POINTS)
        raise ValueError(f"{source}: a threshold is {named} or a finite number, got {option!r}")
    return value, "given"
