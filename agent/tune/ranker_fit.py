"""Train the learned ranker baseline (`agent.backends.ranker`) on the episodes' overview tables.

Features come from the same parsing the backend does at inference (`parse_overview_table` + `row_features`),
so
training and use cannot drift apart. Only unguided training episodes are used: the ranker cannot read
guidance, and a guided target would teach it noise. Two thresholds are kept: the best F1 over the training
patches and the best F2 (recall weighted twice), which the backend uses by default
(`agent.backends.overview.OPERATING_POINTS`).
Rows of the episodes' by-design features (`agent.tune.episode_scans`) also train one recogniser per feature
kind ("is this row that feature?"), which the ranker uses when guidance calls that feature normal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_curve
from sklearn.preprocessing import StandardScaler

from agent.backends.ranker import FORMAT, overview_text, parse_overview_table, row_features
from scans.files import atomic_write_text

RANKER_FILE = "ranker.json"


def ranker_dataset(
    episodes: list[dict],
) -> tuple[list[str], np.ndarray, np.ndarray, list[str | None]]:
    """(feature names, X, y, feature kinds) over every shown patch of the unguided episodes; y = 1 for a
    target patch, and the kind of by-design feature a row is (None for most)."""
    rows: list[dict[str, float]] = []
    labels: list[int] = []
    kinds: list[str | None] = []
    for episode in episodes:
        if episode.get("guidance") is not None:
            continue
        table, total = parse_overview_table(overview_text(episode["messages"]))
        truth = set(episode["truth_patches"])
        features = set(episode.get("feature_patches") or [])
        for row in table:
            rows.append(row_features(row, total))
            labels.append(int(int(row["id"]) in truth))
            kinds.append(episode.get("feature") if int(row["id"]) in features else None)
    if not rows:
        raise ValueError("no unguided episodes with a patch table to train the ranker on")
    names = sorted({k for r in rows for k in r})
    x = np.array([[r.get(k, 0.0) for k in names] for r in rows], dtype=np.float64)
    return names, x, np.array(labels, dtype=np.int64), kinds


def f1_threshold(labels: np.ndarray, scores: np.ndarray, default: float = 0.0) -> tuple[float, float]:
    """(the score threshold with the best F1 on `labels`, that F1); `default` when no threshold exists."""
    return fbeta_threshold(labels, scores, 1.0, default)


def fbeta_threshold(
    labels: np.ndarray, scores: np.ndarray, beta: float, default: float = 0.0
) -> tuple[float, float]:
    """(the score threshold with the best F-beta on `labels`, that F-beta): beta 2 weighs recall twice
    (`agent.backends.overview.OPERATING_POINTS`); `default` when no threshold exists."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    weight = beta * beta
    fbeta = (
        (1 + weight) * precision[:-1] * recall[:-1] / np.maximum(weight * precision[:-1] + recall[:-1], 1e-12)
    )
    if not len(thresholds):
        return default, 0.0
    best = int(np.argmax(fbeta))
    return float(thresholds[best]), float(fbeta[best])


def fit_ranker(
    episodes: list[dict],
    *,
    seed: int = 0,
    c: float = 1.0,
    verbalization: str = "full",
    compact_rows: int | None = None,
) -> dict:
    """The ranker model (a JSON-ready dict) fitted on `episodes`, whose overviews are `verbalization` ones
    with `compact_rows` rows when compact (the backend asks for the same at inference)."""
    names, x, y, kinds = ranker_dataset(episodes)
    if y.min() == y.max():
        raise ValueError("the ranker needs both defect and normal patches among the training episodes")
    scaler = StandardScaler().fit(x)
    standard = scaler.transform(x)

    def logistic(labels: np.ndarray, rows: np.ndarray | None = None, *, recall: bool = False) -> dict:
        inputs = standard if rows is None else standard[rows]
        labels = labels if rows is None else labels[rows]
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000, random_state=seed)
        model.fit(inputs, labels)
        probabilities = model.predict_proba(inputs)[:, 1]
        threshold, f1 = f1_threshold(labels, probabilities, default=0.5)
        fitted = {
            "coef": model.coef_[0].tolist(),
            "intercept": float(model.intercept_[0]),
            "threshold": threshold,
            "train_f1": round(f1, 4),
        }
        if recall:  # the defect model's operating point; a recogniser is only ever read at its best F1
            recall_threshold, f2 = fbeta_threshold(labels, probabilities, 2.0, default=0.5)
            fitted.update(threshold_recall=recall_threshold, train_f2=round(f2, 4))
        return fitted

    defects = logistic(y, recall=True)
    recognisers = {}
    # a recogniser tells a feature from the other rows worth reporting (defects, other features): the rows the
    # ranker would name are the ones it has to sort out
    reported = y == 1
    for kind in sorted({k for k in kinds if k is not None}):
        is_kind = np.array([k == kind for k in kinds], dtype=np.int64)
        if is_kind.sum() == reported.sum():
            continue  # no other reportable rows to tell it from
        recognisers[kind] = {
            "mean": scaler.mean_.tolist(),
            "scale": scaler.scale_.tolist(),
            **logistic(is_kind, reported),
            "rows": int(is_kind.sum()),
        }
    return {
        "format": FORMAT,
        "features": names,
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "coef": defects["coef"],
        "intercept": defects["intercept"],
        "threshold": defects["threshold"],
        "threshold_recall": defects["threshold_recall"],
        "normal_features": recognisers,
        "verbalization": verbalization,
        "compact_rows": compact_rows,
        "trained_on": {"patches": len(y), "defect_patches": int(y.sum()), "seed": seed, "C": c},
    }


def save_ranker(model: dict, out: Path) -> Path:
    """Write `model` as out/ranker.json (`scans.files.atomic_write_text`: never half-written)."""
    return atomic_write_text(out / RANKER_FILE, json.dumps(model, indent=1, sort_keys=True))
