"""A greedy and scoring decoder over one growing text for a local transformers model, reusing its KV cache.

The hf backend writes tool calls through it: `choose` picks among candidate continuations by log-likelihood
(lm-evaluation-harness style, sum of token log-probs), `generate` decodes greedily, optionally restricted to a
set
of tokens, and `extend` forces text. Only the tokens after the common prefix with the cached text are run
again.
"""

from __future__ import annotations

import math
import time
from typing import Any


def _crop(cache: Any, length: int) -> None:
    """Shorten a DynamicCache to `length` tokens (a negative argument means "remove that many" in transformers
    4 and 5)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


class Decoder:
    """Greedy/scoring decoder over one growing text, reusing the KV cache for the common token prefix."""

    def __init__(self, model: Any, tokenizer: Any, torch: Any, deadline: float | None = None):
        self.model, self.tok, self.torch = model, tokenizer, torch
        self.deadline = (
            deadline  # time.monotonic() after which no forward pass starts (the loop's time budget)
        )
        self.text = ""
        self.ids: list[int] = []
        self.cache: Any = None
        self.last_logits: Any = None
        self.generated = 0  # tokens chosen by the model (argmax or likelihood), not forced

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _forward(self, new_ids: list[int]) -> Any:
        """Run `new_ids` after the cached prefix; returns logits (len(new_ids), vocab)."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TimeoutError("hf backend: generation stopped at the call's time limit")
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        with self.torch.no_grad():
            out = self.model(
                input_ids=self.torch.tensor([new_ids]), past_key_values=self.cache, use_cache=True
            )
        return out.logits[0]

    def _sync(self, ids: list[int]) -> None:
        """Make the cache hold exactly `ids` (at least the last token is re-run so last_logits is fresh)."""
        common = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        if self.cache is not None:
            _crop(self.cache, common)
        logits = self._forward(ids[common:])
        self.ids = list(ids)
        self.last_logits = logits[-1]

    def set_text(self, text: str) -> None:
        self.text = text
        self._sync(self._encode(text))

    def extend(self, piece: str) -> None:
        self.set_text(self.text + piece)

    def loglikelihood(self, continuation: str) -> float:
        """log P(continuation | text), summed over the tokens that differ from the current text's tokens."""
        full = self._encode(self.text + continuation)
        common = 0
        for a, b in zip(self.ids, full):
            if a != b:
                break
            common += 1
        if common == len(
            self.ids
        ):  # the usual case: the text's tokens stay, the continuation only adds tokens
            new = full[common:]
            rows = [self.last_logits]
            if len(new) > 1:
                rows.extend(self._forward(new[:-1]))
            _crop(self.cache, common)
            logprobs = self.torch.log_softmax(self.torch.stack(rows).float(), dim=-1)
            return float(sum(logprobs[i, tok] for i, tok in enumerate(new)))
        start = max(common, 1)  # the continuation re-tokenizes the end of the text (e.g. a merged quote)
        _crop(self.cache, start - 1)
        logits = self._forward(full[start - 1 :])
        logprobs = self.torch.log_softmax(logits.float(), dim=-1)
        total = float(sum(logprobs[i, tok] for i, tok in enumerate(full[start:])))
        _crop(self.cache, start - 1)
        self._forward(self.ids[start - 1 :])  # restore the cache for the current text
        return total

    def choose(self, candidates: list[str], endings: tuple[str, ...] = ("",)) -> str:
        """The candidate with the highest log-likelihood (followed by any of `endings`); ties go to the
        first."""
        best, best_score = candidates[0], -math.inf
        for cand in candidates:
            scores = [self.loglikelihood(cand + e) for e in endings]
            peak = max(scores)
            score = peak + math.log(sum(math.exp(s - peak) for s in scores))
            if score > best_score:
                best, best_score = cand, score
        self.generated += len(self._encode(best)) or 1
        return best

    def generate(
        self, allowed: set[int] | None, stop: set[int], max_tokens: int, stop_text: str | None = None
    ) -> str:
        """Greedy tokens (restricted to `allowed` plus `stop` when given) until a stop token; returns the new
        text."""
        produced = ""
        mask = None
        if allowed is not None:
            mask = self.torch.full_like(self.last_logits, float("-inf"))
            mask[list(allowed | stop)] = 0.0
        for _ in range(max_tokens):
            logits = self.last_logits if mask is None else self.last_logits + mask
            token = int(self.torch.argmax(logits))
            if token in stop:
                break
            piece = self.tok.decode([token])
            if stop_text is not None and stop_text in piece:
                produced += piece.split(stop_text)[0]
                break
            produced += piece
            self.generated += 1
            self.ids.append(token)
            self.last_logits = self._forward([token])[-1]
        self.text += produced
        self.set_text(self.text)  # re-tokenize canonically (cheap: the common prefix is reused)
        return produced
