"""A greedy and scoring decoder over one growing text for a local transformers model, reusing its KV cache.

The hf backend writes tool calls through it: `choose` picks among candidate continuations by log-likelihood
(lm-evaluation-harness style, sum of token log-probs), `generate` decodes greedily, optionally restricted to a
set of tokens, and `extend` forces text. Only the tokens after the common prefix with the cached text are run
again, forced text only when a decision needs it, and a choice's candidates together in one pass over their
prefix tree instead of one pass each (README: the hf backend's speed).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    common = 0
    for x, y in zip(a, b):
        if x != y:
            break
        common += 1
    return common


def cache_keyword(model: Any) -> str:
    """The name forward takes the KV cache by: transformers 5.24 renamed `past_key_values` to `cache` (the old
    name warns, and goes in 5.40), and the versions before have only the old one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft adapter
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


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
        self._synced_text: str | None = None  # the text `ids`, the cache and last_logits hold
        self._cache_keyword: str | None = None  # found on the first forward pass (cache_keyword)

    @property
    def cache_keyword(self) -> str:
        """The name the model's forward takes the KV cache by (module function cache_keyword)."""
        if self._cache_keyword is None:
            self._cache_keyword = cache_keyword(self.model)
        return self._cache_keyword

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _forward(self, new_ids: list[int], **model_kwargs: Any) -> Any:
        """Run `new_ids` after the cached prefix; returns logits (len(new_ids), vocab). `model_kwargs`
        (position ids, a 4-D attention mask) go to the model as they are."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TimeoutError("hf backend: generation stopped at the call's time limit")
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        with self.torch.no_grad():
            out = self.model(
                input_ids=self.torch.tensor([new_ids]),
                use_cache=True,
                **{self.cache_keyword: self.cache},
                **model_kwargs,
            )
        return out.logits[0]

    def _tree_forward(self, branches: list[list[int]]) -> list[Any]:
        """Logits at every token of several continuations of the cached text, in one forward pass over their
        prefix tree: a shared prefix ("1" of "1," and "12,") is one node, and each node sees the cached text
        and its ancestors only (a 4-D mask and its own position ids, as tree attention does), instead of one
        pass per continuation. The nodes stay in the cache in order (the caller crops)."""
        torch = self.torch
        inner = getattr(self.cache, "inner", self.cache)  # prompt tuning's cache holds the virtual tokens too
        past = inner.get_seq_length()
        node_of: dict[tuple[int, ...], int] = {}
        tokens: list[int] = []
        ancestry: list[list[int]] = []  # each node's ancestors and itself
        paths: list[list[int]] = []  # each branch's node per token
        for branch in branches:
            path: list[int] = []
            for depth in range(len(branch)):
                key = tuple(branch[: depth + 1])
                if key not in node_of:
                    node_of[key] = len(tokens)
                    tokens.append(branch[depth])
                    ancestry.append([*(ancestry[path[-1]] if path else []), len(tokens) - 1])
                path.append(node_of[key])
            paths.append(path)
        sees = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
        for node, line in enumerate(ancestry):
            sees[node, line] = True
        allowed = torch.cat([torch.ones(len(tokens), past, dtype=torch.bool), sees], dim=1)
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        depth = torch.tensor([len(line) - 1 for line in ancestry])
        logits = self._forward(tokens, position_ids=(past + depth)[None], attention_mask=mask[None, None])
        return [logits[path] for path in paths]

    def loglikelihoods(self, continuations: list[str]) -> list[float]:
        """log P(c | text) of each continuation, over the tokens in which text + c differs from the text's
        own tokens (so a continuation that merges with the text's last token, like "[" + "]" -> "[]", is
        scored as the text it makes), all in one forward pass over their prefix tree. The tree's first branch
        re-runs the text's own last tokens, which leaves the cache and `last_logits` as they were."""
        self.flush()
        fulls = [self._encode(self.text + c) for c in continuations]
        starts = [max(min(_common_prefix(self.ids, full), len(self.ids)), 1) for full in fulls]
        base = min(starts) - 1  # every continuation's scored tokens come after the first `base` tokens
        _crop(self.cache, base)
        # a continuation's last token needs no logits of its own: the node before it predicts it
        rows = self._tree_forward([self.ids[base:], *(full[base:-1] for full in fulls)])
        _crop(self.cache, len(self.ids))  # the text's own branch went in first: the cache holds the text
        self.last_logits = rows[0][-1]
        scores = []
        for full, start, logits in zip(fulls, starts, rows[1:]):
            # the logits at branch position j predict token base + j + 1
            picked = logits[start - base - 1 : len(full) - base - 1].float()
            logprobs = self.torch.log_softmax(picked, dim=-1)
            scores.append(float(sum(logprobs[j, tok] for j, tok in enumerate(full[start:]))))
        return scores

    def loglikelihood(self, continuation: str) -> float:
        """log P(continuation | text) (see :meth:`loglikelihoods`)."""
        return self.loglikelihoods([continuation])[0]

    def _sync(self, ids: list[int]) -> None:
        """Make the cache hold exactly `ids` (at least the last token is re-run so last_logits is fresh)."""
        common = min(_common_prefix(self.ids, ids), len(ids) - 1)
        if self.cache is not None:
            _crop(self.cache, common)
        self.ids = list(ids[:common])  # what the cache holds, should the forward pass stop (a time limit)
        logits = self._forward(ids[common:])
        self.ids = list(ids)
        self.last_logits = logits[-1]

    def set_text(self, text: str) -> None:
        """Make `text` the current text; the model runs on it at the next decision (:meth:`flush`), so forced
        pieces in a row (JSON punctuation, keys) cost one forward pass, not one each."""
        self.text = text

    def extend(self, piece: str) -> None:
        self.text += piece

    def flush(self) -> None:
        """Run the model on what the text gained since the cache last matched it (the common token prefix is
        kept)."""
        if self.text != self._synced_text:
            self._sync(self._encode(self.text))
            self._synced_text = self.text

    def reset(self) -> None:
        """Forget the cache (after a call that stopped part-way, whose cache may not match `ids`)."""
        self.text, self._synced_text, self.ids, self.cache, self.last_logits = "", None, [], None, None

    def choose(self, candidates: list[str], endings: tuple[str, ...] = ("",)) -> str:
        """The candidate with the highest log-likelihood (followed by any of `endings`); ties go to the
        first."""
        best, best_score = candidates[0], -math.inf
        flat = self.loglikelihoods([cand + e for cand in candidates for e in endings])
        for n, cand in enumerate(candidates):
            scores = flat[n * len(endings) : (n + 1) * len(endings)]
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
        self.flush()
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
        self.text += produced  # the next flush re-tokenizes it canonically (the common prefix is reused)
        return produced
