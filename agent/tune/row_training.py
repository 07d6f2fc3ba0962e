"""Training on a yes/no per shown row (`agent.tune train --target rows`), as `agent.backends.hf_rows` asks it.

Each episode becomes one example: the prompt the hf backend decodes after, then every shown row's question
("Patch 17: defect?", or the row's line: `--row-question line`) as a branch that sees the prompt and itself
only (a 4-D attention mask and per-branch position ids, the prefix tree the decoder scores at inference), so
training and use see the same thing. The loss is a class-balanced logistic loss on each row's gap log P(yes) -
log P(no) at its question's last token; a row is a "yes" when it is one of the episode's ground-truth patches
(after guidance). After training, the thresholds on that gap that maximise F1 and F2 over the training rows go
into the recipe, as the learned ranker's do (`agent.backends.overview.OPERATING_POINTS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.backends.hf_rows import ANSWERS, row_preamble, row_questions
from agent.backends.overview import overview_text
from agent.tune.ranker_fit import f1_threshold, fbeta_threshold


@dataclass(frozen=True)
class RowExample:
    """One episode as a prompt and a branch of question tokens per shown row, with the rows' labels."""

    prompt: list[int]
    branches: list[list[int]]  # each row's question tokens (its answer is the next token)
    labels: list[int]  # 1 = a ground-truth defect patch


def answer_tokens(tokenizer: Any) -> tuple[int, int]:
    """The single token ids of " yes" and " no" (a tokenizer that splits them cannot be trained this way)."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"row answers {ANSWERS} are not one token each for this tokenizer: {ids}")
    return ids[0][0], ids[1][0]


def row_examples(
    backend: Any, episodes: list[dict], max_tokens: int, form: str = "id"
) -> tuple[list[RowExample], int]:
    """One RowExample per episode within `max_tokens` (prompt plus every branch), its rows asked about in
    `form` (`ROW_QUESTIONS`), and how many were skipped."""
    tok = backend.tokenizer
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples, skipped = [], 0
    for episode in episodes:
        overview = overview_text(episode["messages"])
        text = backend.prompt(episode["messages"], episode["tools"]) + row_preamble(form, overview)
        prompt = encode(text)
        ids, questions = row_questions(form, overview)
        truth = set(episode["truth_patches"])
        branches = []
        for question in questions:
            full = encode(text + question)
            if full[: len(prompt)] != prompt:
                raise ValueError(f"episode {episode.get('id')}: the question changes the prompt's tokens")
            branches.append(full[len(prompt) :])
        if not branches or len(prompt) + sum(len(b) for b in branches) > max_tokens:
            skipped += 1
            continue
        examples.append(RowExample(prompt, branches, [int(pid in truth) for pid in ids]))
    return examples, skipped


def tree_inputs(
    torch: Any, prompt_len: int, branches: list[list[int]], dtype: Any
) -> tuple[Any, Any, list[int]]:
    """(4-D additive attention mask, position ids, each branch's last position) for prompt + branches: the
    prompt is causal, each branch sees the prompt and its own earlier tokens."""
    total = prompt_len + sum(len(b) for b in branches)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:prompt_len, :prompt_len] = torch.tril(torch.ones(prompt_len, prompt_len, dtype=torch.bool))
    positions = list(range(prompt_len))
    ends, start = [], prompt_len
    for branch in branches:
        stop = start + len(branch)
        allowed[start:stop, :prompt_len] = True
        allowed[start:stop, start:stop] = torch.tril(torch.ones(len(branch), len(branch), dtype=torch.bool))
        positions.extend(range(prompt_len, prompt_len + len(branch)))
        ends.append(stop - 1)
        start = stop
    mask = torch.zeros(total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None], torch.tensor([positions]), ends


def row_gaps(model: Any, torch: Any, example: RowExample, yes_no: tuple[int, int]) -> Any:
    """log P(yes) - log P(no) after each branch (a tensor, one per row) in one forward pass."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = next(base.parameters()).dtype
    mask, positions, ends = tree_inputs(torch, len(example.prompt), example.branches, dtype)
    tokens = example.prompt + [t for b in example.branches for t in b]
    hidden = base.model(
        input_ids=torch.tensor([tokens]), attention_mask=mask, position_ids=positions
    ).last_hidden_state
    logits = base.lm_head(hidden[0, ends]).float()
    return logits[:, yes_no[0]] - logits[:, yes_no[1]]


def positive_weight(examples: list[RowExample]) -> float:
    """The weight of a "yes" row that balances the classes over all training rows (as the ranker's
    class_weight="balanced")."""
    positives = sum(sum(e.labels) for e in examples)
    negatives = sum(len(e.labels) for e in examples) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("row training needs both defect and normal rows among the training episodes")
    return negatives / positives


def row_loss(model: Any, torch: Any, example: RowExample, yes_no: tuple[int, int], pos_weight: float) -> Any:
    """Class-balanced logistic loss of one example's rows."""
    gaps = row_gaps(model, torch, example, yes_no)
    labels = torch.tensor(example.labels, dtype=gaps.dtype)
    return torch.nn.functional.binary_cross_entropy_with_logits(
        gaps, labels, pos_weight=torch.tensor(pos_weight, dtype=gaps.dtype)
    )


def fitted_threshold(model: Any, torch: Any, examples: list[RowExample], yes_no: tuple[int, int]) -> dict:
    """The gap thresholds with the best F1 and the best F2 over the training rows, with what they reach."""
    import numpy as np

    gaps: list[float] = []
    labels: list[int] = []
    with torch.no_grad():
        for example in examples:
            gaps.extend(float(g) for g in row_gaps(model, torch, example, yes_no))
            labels.extend(example.labels)
    threshold, f1 = f1_threshold(np.array(labels), np.array(gaps))
    recall_threshold, f2 = fbeta_threshold(np.array(labels), np.array(gaps), 2.0)
    return {
        "row_threshold": threshold,
        "row_threshold_train_f1": round(f1, 4),
        "row_threshold_recall": recall_threshold,  # best F2: the backend's default operating point
        "row_threshold_recall_train_f2": round(f2, 4),
        "rows_scored": len(gaps),
    }
