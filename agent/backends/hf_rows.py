"""Row scoring: a tuned model's yes/no judgement on every patch row the overview shows, made into one report.

Why: a report target of several ids is one sequence per episode, and the decoder's stop-or-continue choices
compound (an adapter trained on targets of up to 6 ids reported nothing on any dev-benchmark scan). Asking
"Patch 17: defect? yes|no" (or the row's own line: `ROW_QUESTIONS`) of every shown row gives each row its own
label, the supervision the learned ranker gets, and costs one forward pass at inference: every row's question
branches off the prompt in one prefix tree (`Decoder.loglikelihoods`), so no row's answer sees another's. An
adapter trained this way (`python -m agent.tune train --target rows`, recipe target "rows") records the score
thresholds that maximised F1 and F2 on its training rows; the report names the rows at or above the F2 one
(`agent.backends.overview.OPERATING_POINTS`; the hf backend's `row_threshold` chooses another), highest first,
within the same share of the scan's points the ranker keeps to. Guidance is not in its prompt by default; the
pipeline applies it to the report (`agent.guided_report`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from agent.backends.overview import row_reason, table_lines
from agent.guidance import GUIDANCE_SECTION

# How a row is asked about: "id" names the patch, so the model must find its row in the table; "line" quotes
# the row as the table shows it, so the answer can be read off the question, the table still in view for
# comparison and the guidance. "guided" asks as "line" does, after the operator's guidance is repeated once in
# the answer's turn (`row_preamble`), so every question follows it directly instead of after the chat
# template's turn markers. An adapter's recipe records the form it was trained on ("id" when absent).
ROW_QUESTIONS = {
    "id": "Patch {patch_id}: defect?",
    "line": "Row {line} -> defect?",
    "guided": "Row {line} -> defect?",
}
ROW_PREAMBLES = {"guided": "Operator guidance: {guidance}\n"}
ROW_LIMIT = 20  # most rows one report names, as the ranker's max_ids
ANSWERS = (" yes", " no")  # one token each in SmolLM2's vocabulary, checked where the training builds them


def row_questions(form: str, overview: str) -> tuple[list[int], list[str]]:
    """The shown patch ids (table order) and the question about each whose next token is the model's answer
    (training and inference)."""
    if form not in ROW_QUESTIONS:
        raise ValueError(f"unknown row question form {form!r} (known: {', '.join(ROW_QUESTIONS)})")
    lines = table_lines(overview)
    return list(lines), [ROW_QUESTIONS[form].format(patch_id=pid, line=line) for pid, line in lines.items()]


def row_preamble(form: str, overview: str) -> str:
    """What goes once between the prompt and the row questions: for the "guided" form, the guidance section
    of the overview (as the verbalizer cleaned it), else nothing."""
    template = ROW_PREAMBLES.get(form)
    if template is None:
        return ""
    match = GUIDANCE_SECTION.search(overview)
    return template.format(guidance=" ".join(match.group(1).split())) if match else ""


def row_scores(decoder: Any, questions: list[str], preamble: str = "") -> list[float]:
    """log P(yes) - log P(no) after each question, all branching off the decoder's current text (plus the
    `preamble`, taken off again afterwards)."""
    if not questions:
        return []
    before = decoder.text
    if preamble:
        decoder.extend(preamble)
    try:
        lls = decoder.loglikelihoods([q + answer for q in questions for answer in ANSWERS])
    finally:
        decoder.set_text(before)
    return [lls[2 * n] - lls[2 * n + 1] for n in range(len(questions))]


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
