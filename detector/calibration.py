"""The object-level threshold: when is a whole scan called defective?

Why leave-one-template-out: a normal test scan is a fresh sample of the part that the bank has never seen, and the
closest we get to that at fit time is each template's bank views scored against the rows that came from the *other*
templates. Every such view gives one normal object score (the same PatchCore-reweighted max that a test scan gets).

The rule (no per-class tuning): threshold = max of those normal object scores + their standard deviation. The max
alone would call a normal scan defective whenever it lands a hair above the worst template; one spread above it is
a margin that grows with how much the class's normal scans vary, in the class's own units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from detector.bank import MemoryBank

OBJECT_THRESHOLD = "object_threshold"   # key in FittedClass.thresholds (saved in fitted.json)
Verdict = Literal["defective", "normal"]


def loo_object_scores(bank: MemoryBank, views: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """One normal object score per (features, leave-one-out distances, nearest bank rows) bank view; views whose
    distances are not all finite (no row from another template near them) are left out."""
    scores = [bank.object_score(feats, dist, nn) for feats, dist, nn in views
              if len(dist) and np.isfinite(dist).all()]
    return np.asarray(scores, dtype=np.float64)


def object_threshold(normal_scores: np.ndarray) -> dict[str, float]:
    """The threshold (see the module doc) and the normal scores' summary it came from; empty without scores."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        return {}
    return {OBJECT_THRESHOLD: float(scores.max() + scores.std()), "object_normal_max": float(scores.max()),
            "object_normal_median": float(np.median(scores)), "object_normal_n": float(scores.size)}


def verdict_of(object_score: float, threshold: float | None) -> Verdict | None:
    """'defective' above the threshold, 'normal' at or below it, None without a calibrated threshold."""
    if threshold is None:
        return None
    return "defective" if object_score > threshold else "normal"
