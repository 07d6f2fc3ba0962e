"""Huge scans: analyse a bounded, seeded sample of the points and give every input point the score of its
nearest analysed point.

Why: the analysis keeps several per-point arrays (statistics, interpolation support, the verbalizer's patches,
the verifier's scores), so its memory grows with the point count: at the 50M-point input limit it needs about
10 GB. The detector looks at a few hundred patches of a few dozen points each, so a uniform sample of
MAX_ANALYSIS_POINTS points keeps what it sees; spreading the sample's scores back by nearest neighbour gives
one score per input point again, and the sampled points keep exactly their own scores.
"""

from __future__ import annotations

import numpy as np

# points analysed per scan; larger scans are sampled (agent.run --max-analysis-points)
MAX_ANALYSIS_POINTS = 1_000_000
_QUERY_CHUNK = 500_000           # points per nearest-neighbour query block (bounded temporary memory)


def analysis_rows(n_points: int, cap: int = MAX_ANALYSIS_POINTS, seed: int = 0) -> np.ndarray | None:
    """Sorted int64 rows of a seeded uniform sample of ``cap`` points, or None when all ``n_points`` fit."""
    if cap < 1:
        raise ValueError(f"the analysis cap must be at least 1 point, got {cap}")
    if n_points <= cap:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_points, size=cap, replace=False)).astype(np.int64)


def spread_to_all(points: np.ndarray, rows: np.ndarray, sample_scores: np.ndarray) -> np.ndarray:
    """float32 (N,): each point's score is that of its nearest sampled point (``points[rows]`` scored as
    ``sample_scores``); sampled points keep their own scores exactly."""
    from scipy.spatial import cKDTree

    sample_scores = np.asarray(sample_scores, dtype=np.float32).reshape(-1)
    if len(sample_scores) != len(rows):
        raise ValueError(f"{len(sample_scores)} scores for {len(rows)} sampled points")
    tree = cKDTree(np.asarray(points[rows], dtype=np.float64))
    out = np.empty(len(points), dtype=np.float32)
    order = _spatial_order(points)
    for start in range(0, len(points), _QUERY_CHUNK):
        idx = order[start:start + _QUERY_CHUNK]
        _, nearest = tree.query(np.asarray(points[idx], dtype=np.float64), k=1)
        out[idx] = sample_scores[nearest]
    out[rows] = sample_scores
    return out


def _spatial_order(points: np.ndarray, cells: int = 64) -> np.ndarray:
    """Row order that visits the points cell by cell of a cells^3 grid: neighbouring queries then walk the
    same branches of the k-d tree, which makes the search several times faster than a scattered file order."""
    low = points.min(axis=0).astype(np.float64)
    size = max(float((points.max(axis=0).astype(np.float64) - low).max()) / cells, 1e-30)
    keys = np.empty(len(points), dtype=np.int64)
    for start in range(0, len(points), _QUERY_CHUNK):
        cell = np.clip(((points[start:start + _QUERY_CHUNK] - low) / size).astype(np.int64), 0, cells - 1)
        keys[start:start + len(cell)] = (cell[:, 0] * cells + cell[:, 1]) * cells + cell[:, 2]
    return np.argsort(keys, kind="stable")
