"""A learned non-LLM ranker: logistic regression over the patch table the overview shows, as a backend.

Why: the honest baseline for a tuned LLM is learning without a language model, trained on the same episodes
(`python -m agent.tune train --method ranker`). Like the policy it sees only the conversation: it reads the
patch
table out of the overview message (the same numbers a model reads), scores every shown row with the saved
coefficients (plain Python, no numpy: a backend never imports it), and reports in one turn the patches whose
probability reaches the saved threshold, highest first, while their points stay within `target_share` of the
scan.
Guidance it cannot learn from the episodes' numbers is read by `agent.guidance` instead: each row's
probability is multiplied by the guidance's weight for that patch (ignored regions and patches unusual mostly
for a named normal feature drop out, a named defect kind's cues count more), capped at 1, before the
threshold.
The model's own coefficients already weigh the feature statistics it learned, so they are not scaled
again. A normal feature the model file has a learned recogniser for (`normal_features`: a logistic regression
trained on the episodes' by-design features, `agent.tune.ranker_fit`) is not read through the hand-written
statistics of `agent.guidance`: the rows its recogniser calls that feature are dropped instead (what a
feature raises in the table is learned, not assumed).

Model file: JSON with the feature names, standardisation (mean, scale), coefficients, intercept and threshold;
no
pickles, so a model file is data anyone can read.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from agent.backends.base import BackendUnavailable, LLMReply, ToolCall, Usage, recorded_count, tool_names
from agent.backends.overview import (
    operating_threshold,
    overview_text,
    parse_overview_table,
    row_reason,
    select_rows,
)
from agent.backends.policy import report_limits
from agent.guidance import guidance_in_messages, left_to_backend, read_guidance, reading_summary

FORMAT = "scanagent-patch-ranker"
POSITION_COLUMNS = ("id", "x", "y", "z")


def row_features(row: dict[str, float], total_points: int | None) -> dict[str, float]:
    """The features of one row: every shown statistic but the position, point count as a share of the scan."""
    features = {k: v for k, v in row.items() if k not in POSITION_COLUMNS and k != "n_points"}
    if "n_points" in row and total_points:
        features["point_share"] = row["n_points"] / total_points
    return features


class LogisticRows:
    """A saved logistic regression over row features: standardisation, coefficients, intercept, threshold."""

    def __init__(self, features: list[str], data: dict, source: str):
        self.features = features
        self.mean = [float(v) for v in data["mean"]]
        self.scale = [float(v) if float(v) > 0 else 1.0 for v in data["scale"]]
        self.coef = [float(v) for v in data["coef"]]
        self.intercept = float(data["intercept"])
        self.threshold = float(data["threshold"])
        # best F2 on the training rows (agent.backends.overview.OPERATING_POINTS); None in older files
        recall = data.get("threshold_recall")
        self.threshold_recall = None if recall is None else float(recall)
        if not len(self.features) == len(self.mean) == len(self.scale) == len(self.coef):
            raise ValueError(f"{source}: features, mean, scale and coef must have the same length")

    def probability(self, features: dict[str, float]) -> float:
        """P(positive) of one row; a feature the row lacks counts as the training mean (no evidence)."""
        logit = self.intercept
        for name, mean, scale, coef in zip(self.features, self.mean, self.scale, self.coef):
            logit += coef * (features.get(name, mean) - mean) / scale
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit))))


class RankerModel(LogisticRows):
    """Saved coefficients of the logistic regression, its learned normal-feature recognisers, and how to apply
    them."""

    def __init__(self, data: dict, source: str = "ranker model"):
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a {FORMAT} file (format={data.get('format')!r})")
        super().__init__(list(data["features"]), data, source)
        self.verbalization = str(data.get("verbalization", "full"))  # the overview it was trained on
        # and its row count (None: the default)
        self.compact_rows = recorded_count(data.get("compact_rows"), source, "compact_rows")
        # a normal feature's recogniser: P(this row is that by-design feature), over the same features
        self.recognisers = {
            name: LogisticRows(self.features, entry, f"{source}: normal_features.{name}")
            for name, entry in (data.get("normal_features") or {}).items()
        }

    @classmethod
    def load(cls, path: str | Path) -> RankerModel:
        try:
            return cls(json.loads(Path(path).read_text(encoding="utf-8")), str(path))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: cannot read the ranker model ({err})") from None


class RankerBackend:
    name = "ranker"
    tokenizes = False  # it reads the table as data: no context window applies
    uses_guidance = True  # read into intents by agent.guidance; `guidance_reading` says how it was applied

    def __init__(
        self,
        model: str | Path | None = None,
        target_share: float = 0.15,
        max_ids: int = 20,
        threshold: float | str | None = None,
    ):
        if model is None:
            raise BackendUnavailable(
                'ranker backend needs a model file: --backend-kwargs \'{"model": '
                '"ADAPTER/ranker.json"}\' (train one with python -m agent.tune train '
                "--method ranker)"
            )
        try:
            self.model = RankerModel.load(model)
        except ValueError as err:
            raise BackendUnavailable(str(err)) from err
        self.target_share = target_share
        self.max_ids = max_ids
        # the probability a row must reach to be named: "recall" (the default where the file records it), "f1"
        # or a number; a lower one trades verified points for recall (README, "Recall at the same verified
        # share")
        try:
            self.threshold, self.operating_point = operating_threshold(
                threshold, self.model.threshold, self.model.threshold_recall, f"ranker model {model}"
            )
        except ValueError as err:
            raise BackendUnavailable(f"ranker backend: {err}") from None
        if not 0.0 <= self.threshold <= 1.0:
            raise BackendUnavailable(
                f"ranker backend: threshold must be a probability in [0, 1], got {threshold!r}"
            )
        self.verbalization = self.model.verbalization  # agent.pipeline gives it the overview it learned on
        self.compact_rows = self.model.compact_rows

    def ranked(self, messages: list[dict]) -> list[tuple[int, float, dict[str, float]]]:
        """(patch id, probability, row) of every shown patch, most likely first."""
        rows, total = parse_overview_table(overview_text(messages))
        intents, learned = self._intents(messages)
        scored = []
        for r in rows:
            features = row_features(r, total)
            if any(
                self.model.recognisers[f].probability(features) >= self.model.recognisers[f].threshold
                for f in learned
            ):
                continue  # a by-design feature the guidance calls normal
            p = self.model.probability(features)
            weight = 1.0 if intents is None else intents.weight(r, scale_normal=False)
            if weight is not None:
                scored.append((int(r["id"]), min(1.0, p * weight), r))
        return sorted(scored, key=lambda t: (-t[1], t[0]))

    def _intents(self, messages: list[dict]):
        """The guidance's intents left to `agent.guidance`'s rules, and the named normal features this model
        has a learned recogniser for."""
        text = guidance_in_messages(messages)
        if not text:
            return None, []
        intents = left_to_backend(read_guidance(text))
        learned = [f for f in intents.normal_features if f in self.model.recognisers]
        rest = tuple(f for f in intents.normal_features if f not in learned)
        return replace(intents, normal_features=rest), learned

    def guidance_reading(self, messages: list[dict]) -> dict:
        """How the guidance in the conversation was read and applied (report.json's `guidance` entry)."""
        summary = reading_summary(messages, "ranker")
        intents, learned = self._intents(messages)
        if learned:  # say what was done: the recogniser, not agent.guidance's statistics, for these features
            parts = [f"drops the patches its learned recogniser calls {f}" for f in learned]
            summary["applied"] = "; ".join(parts + ([intents.describe()] if intents.active else []))
            summary["learned_recognisers"] = learned
        return summary

    def chat(self, messages: list[dict], tools: list[dict]) -> LLMReply:
        if "report_suspects" not in tool_names(tools):
            raise ValueError("ranker backend needs a report_suspects tool")
        _, total = parse_overview_table(overview_text(messages))
        max_regions, max_ids = report_limits(tools)
        limit = min(self.max_ids, max_ids or self.max_ids)
        chosen = select_rows(self.ranked(messages), self.threshold, limit, self.target_share, total)
        regions = []
        if chosen and max_regions != 0:
            reason = row_reason(chosen[0][2])
            regions.append(
                {
                    "patch_ids": [pid for pid, _, _ in chosen],
                    "reason": f"ranker p={chosen[0][1]:.2f}: {reason}",
                    "confidence": round(chosen[0][1], 2),
                }
            )
        n_calls = sum(len(m.get("tool_calls") or []) for m in messages)
        call = ToolCall(
            id=f"ranker_{n_calls}", name="report_suspects", arguments=json.dumps({"regions": regions})
        )
        return LLMReply(text=None, tool_calls=[call], usage=Usage())
