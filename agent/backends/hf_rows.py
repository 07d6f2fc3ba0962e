"""Row scoring: a tuned model's yes/no judgement on every patch row the overview shows, made into one report.

Why: a report target of several ids is one sequence per episode, and the decoder's stop-or-continue choices
compound (an adapter trained on targets of up to 6 ids reported nothing on any dev-benchmark scan). Asking
"Patch 17: defect? yes|no" of every shown row gives each row its own label, the supervision the learned
ranker gets, and costs one forward pass at inference: every row's question branches off the prompt in one
prefix tree (`Decoder.loglikelihoods`), so no row's answer sees another's. An adapter trained this way
(`python -m agent.tune train --target rows`, recipe target "rows") records the score threshold that maximised
F1 on its training rows; the report names the rows at or above it, highest first, within the same share of
the scan's points the ranker keeps to. The model reads the guidance in its prompt; nothing re-weights its
scores afterwards.
"""

from __future__ import annotations

import json
import math
from typing import Any

from agent.backends.overview import row_reason

ROW_QUESTION = "Patch {patch_id}: defect?"
ROW_LIMIT = 20  # most rows one report names, as the ranker's max_ids
ANSWERS = (" yes", " no")  # one token each in SmolLM2's vocabulary, checked where the training builds them


def row_question(patch_id: int) -> str:
    """The question whose next token is the model's answer about one patch (training and inference)."""
    return ROW_QUESTION.format(patch_id=patch_id)


def row_scores(decoder: Any, patch_ids: list[int]) -> list[float]:
    """log P(yes) - log P(no) after each patch's question, all branching off the decoder's current text."""
    if not patch_ids:
        return []
    lls = decoder.loglikelihoods([row_question(pid) + answer for pid in patch_ids for answer in ANSWERS])
    return [lls[2 * n] - lls[2 * n + 1] for n in range(len(patch_ids))]


def rows_report_arguments(
    chosen: list[tuple[int, float, dict[str, float]]], max_regions: int | None, source: str
) -> str:
    """report_suspects arguments naming the chosen rows as one region, its reason the first row's
    statistics and its confidence the first row's probability (sigmoid of its score)."""
    regions = []
    if chosen and max_regions != 0:
        top_id, top_score, top_row = chosen[0]
        confidence = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, top_score))))
        regions.append(
            {
                "patch_ids": [pid for pid, _, _ in chosen],
                "reason": f"{source}: overview row of patch {top_id}: {row_reason(top_row)}",
                "confidence": round(min(max(confidence, 0.0), 1.0), 2),
            }
        )
    return json.dumps({"regions": regions})
