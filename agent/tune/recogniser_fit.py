"""Train the normal-feature recognisers (`agent.normal_features`) on the episodes' by-design features.

    python -m agent.tune train --episodes EPISODES --out DIR --method recogniser

Per feature kind, a logistic regression tells that feature's patches from the defects' patches, over what the
pipeline shows it at inference (`recogniser_features`: the table's z-scores and cue, the shape descriptors of
`verbalize.shape`), read from the unguided training episodes' `recogniser_rows`, so training and use cannot
drift apart.

The threshold protects recall: a defect is lost when the patches of it that a backend reported are all called
the feature, and which of its patches a backend reports is not known in advance, so every defect patch is
protected: the threshold is set above what all but DEFECT_MISS_SHARE of the training defect patches reach,
measured on out-of-fold probabilities (folds by scan, so a scan's own rows never set its threshold), and never
below 0.5. Dropping a defect because guidance called something else normal is the costly error; leaving some
of a feature in is the cheap one. (Protecting each defect only by its least feature-like patch, the
thirteenth-session variant, dropped one hole defect of 20 with the bolt holes; README.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.preprocessing import StandardScaler

from agent.normal_features import FORMAT
from scans.files import atomic_write_text

RECOGNISER_FILE = "normal-features.json"
DEFECT_MISS_SHARE = 0.02  # of the training defect patches, at most this share may be called the feature
NORMAL_ADD_SHARE = 0.01  # of the training normal patches, at most this share may be added as a named kind
MIN_THRESHOLD = 0.5
FOLDS = 5


def recogniser_dataset(
    episodes: list[dict],
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(feature names, X, labels, scan of each row, the scan's defect kind or "") over the unguided episodes'
    recogniser rows."""
    rows, labels, scans, defects = [], [], [], []
    for episode in episodes:
        if episode.get("guidance") is not None:
            continue
        for row in episode.get("recogniser_rows") or []:
            rows.append(row["values"])
            labels.append(row["label"])
            scans.append(episode["scan"])
            defects.append(episode.get("defect") or "")
    if not rows:
        raise ValueError(
            "no recogniser rows in the training episodes (make them with this version's "
            "python -m agent.tune episodes, --feature-share above 0)"
        )
    names = sorted({k for r in rows for k in r})
    x = np.array([[r.get(k, 0.0) for k in names] for r in rows], dtype=np.float64)
    return names, x, np.array(labels), np.array(scans), np.array(defects)


def _threshold(probability: np.ndarray, is_defect: np.ndarray) -> float:
    """The lowest threshold (>= MIN_THRESHOLD) that at most DEFECT_MISS_SHARE of the defect patches reach."""
    if not is_defect.any():
        return MIN_THRESHOLD
    return float(max(MIN_THRESHOLD, np.quantile(probability[is_defect], 1.0 - DEFECT_MISS_SHARE)))


def _logistic(
    x: np.ndarray, y: np.ndarray, scans: np.ndarray, seed: int, c: float
) -> tuple[dict, np.ndarray]:
    """A balanced logistic regression on standardised `x` (JSON-ready, without threshold) and its out-of-fold
    probabilities (folds by scan)."""
    scaler = StandardScaler().fit(x)
    inputs = scaler.transform(x)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    folds = min(FOLDS, len(set(scans.tolist())))
    if folds >= 2:
        folded = GroupKFold(folds)
        held_out = cross_val_predict(model, inputs, y, groups=scans, cv=folded, method="predict_proba")[:, 1]
    else:  # one scan only: no held-out estimate, the in-sample one
        held_out = model.fit(inputs, y).predict_proba(inputs)[:, 1]
    model.fit(inputs, y)
    entry = {
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "coef": model.coef_[0].tolist(),
        "intercept": float(model.intercept_[0]),
    }
    return entry, held_out


def fit_recognisers(episodes: list[dict], *, seed: int = 0, c: float = 1.0) -> dict:
    """The recognisers (a JSON-ready dict) fitted on `episodes`: one per feature kind with rows of its own
    and defect rows to tell it from, and one per defect kind (`defect_kinds`) against every other patch."""
    names, x, labels, scans, defects = recogniser_dataset(episodes)
    kinds = {}
    for kind in sorted(set(labels.tolist()) - {"defect", "normal"}):
        rows = (labels == kind) | (labels == "defect")
        y = (labels[rows] == kind).astype(np.int64)
        if y.min() == y.max():
            continue
        entry, held_out = _logistic(x[rows], y, scans[rows], seed, c)
        threshold = _threshold(held_out, y == 0)
        kinds[kind] = {
            "features": names,
            **entry,
            "threshold": threshold,
            "rows": int(y.sum()),
            "defect_rows": int((y == 0).sum()),
            "held_out_feature_recall": round(float(np.mean(held_out[y == 1] >= threshold)), 4),
        }
    if not kinds:
        raise ValueError("the recognisers need rows of a by-design feature and of defects among the episodes")
    look_for = {}
    for kind in sorted(set(defects[labels == "defect"].tolist()) - {""}):
        y = ((labels == "defect") & (defects == kind)).astype(np.int64)
        if y.sum() == 0 or y.sum() == len(y) or not (labels == "normal").any():
            continue
        entry, held_out = _logistic(x, y, scans, seed, c)
        normal = labels == "normal"
        threshold = float(max(MIN_THRESHOLD, np.quantile(held_out[normal], 1.0 - NORMAL_ADD_SHARE)))
        look_for[kind] = {
            "features": names,
            **entry,
            "threshold": threshold,
            "rows": int(y.sum()),
            "held_out_recall": round(float(np.mean(held_out[y == 1] >= threshold)), 4),
        }
    return {
        "format": FORMAT,
        "kinds": kinds,
        "defect_kinds": look_for,
        "trained_on": {"rows": len(labels), "scans": len(set(scans.tolist())), "seed": seed, "C": c},
    }


def save_recognisers(model: dict, out: Path) -> Path:
    """Write `model` as out/normal-features.json (`scans.files.atomic_write_text`: never half-written)."""
    return atomic_write_text(out / RECOGNISER_FILE, json.dumps(model, indent=1, sort_keys=True))
