"""Spreading per-patch values over the points: inverse-distance weights over each point's nearest patch
centres.

PointNet++'s feature propagation, as M3DM's ``interpolating_points``. Statistics and bank scores are spread
over the
same support, so a point's score depends on exactly its supporting patches; that is what lets the verifier
score a
subset of patches and get the full scoring's values for the points they support.
"""

from __future__ import annotations

import numpy as np


def interpolation_support(
    points: np.ndarray, centers: np.ndarray, k: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Each point's k nearest centres and their weights 1/d^2 (normalised): the support of
    :func:`interpolate_to_points`. int64 (N,k), float32 (N,k)."""
    import faiss

    pts = np.ascontiguousarray(points, dtype=np.float32)
    ctr = np.ascontiguousarray(centers, dtype=np.float32)
    k = min(k, len(ctr))
    index = faiss.IndexFlatL2(3)
    index.add(ctr)
    d2, nn_idx = index.search(pts, k)
    w = 1.0 / (np.maximum(d2, 0.0) + 1e-8)
    w /= w.sum(axis=1, keepdims=True)
    return nn_idx.astype(np.int64), w.astype(np.float32)


def interpolate_with(support: tuple[np.ndarray, np.ndarray], values: np.ndarray) -> np.ndarray:
    """Spread per-centre values (G,) or (G,D) over a precomputed support -> (N,) or (N,D) float32."""
    nn_idx, w = support
    vals = np.asarray(values, dtype=np.float32)
    flat = vals.reshape(len(vals), -1)
    out = np.einsum("nk,nkd->nd", w, flat[nn_idx])
    return out.reshape((len(nn_idx),) + vals.shape[1:]).astype(np.float32)


def interpolate_to_points(
    points: np.ndarray, centers: np.ndarray, values: np.ndarray, k: int = 3
) -> np.ndarray:
    """Spread per-patch values to every point: weights 1/d^2 over the k nearest centres (PointNet++ feature
    propagation, as M3DM's ``interpolating_points``). values (G,) or (G,D) -> (N,) or (N,D) float32."""
    if len(centers) != len(values):
        raise ValueError(f"{len(centers)} centres but {len(values)} values")
    return interpolate_with(interpolation_support(points, centers, k), values)
