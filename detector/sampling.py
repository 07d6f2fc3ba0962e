"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

The coreset keeps the training patches that cover feature space best: each pick is the patch farthest from all
earlier picks, so rare normal patterns survive while thousands of near-duplicates collapse to a few. Distances
are measured after a sparse random projection (Johnson-Lindenstrauss: distances survive up to a small factor)
to
make the O(M * n) greedy loop cheap for 1000+-dimensional features.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["KCenterGreedy"]


class KCenterGreedy:
    """Pick `ratio` of the rows of a feature matrix by greedy max-min (k-center) selection.

    ratio: share of rows to keep, in (0, 1]; at least one row is kept.
    seed: fixes both the random projection and the first pick, so the same input always gives the same picks.
    projection_dim: project to this many dimensions before measuring distances when the features are wider;
        None (or a width >= the feature width) measures distances on the raw features.
    """

    def __init__(self, ratio: float, seed: int = 0, projection_dim: int | None = 128) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"KCenterGreedy: ratio must be in (0, 1], got {ratio}")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"KCenterGreedy: projection_dim must be >= 1 or None, got {projection_dim}")
        self.ratio = ratio
        self.seed = seed
        self.projection_dim = projection_dim

    def project(self, features: np.ndarray) -> np.ndarray:
        """The float32 matrix the greedy loop measures distances on (projected when wider than
        projection_dim)."""
        feats = np.asarray(features)
        if self.projection_dim is not None and feats.shape[1] > self.projection_dim:
            # sklearn (with scipy.stats behind it) only when a coreset is built, i.e. in a fit: a run that
            # loads a fitted bank does not pay for its import
            from sklearn.random_projection import SparseRandomProjection

            proj = SparseRandomProjection(n_components=self.projection_dim, random_state=self.seed)
            feats = proj.fit_transform(feats.astype(np.float32, copy=False))
        return np.ascontiguousarray(feats, dtype=np.float32)

    def select(self, features: np.ndarray, n: int | None = None) -> np.ndarray:
        """Indices (int64, in pick order) of the coreset rows of `features` (M, D).

        n overrides the count implied by `ratio` (used to cap a bank's size); it is clipped to M.
        The first pick is drawn from the seed; every next pick maximises the distance to its nearest earlier
        pick
        (first row wins exact ties).
        """
        feats = np.asarray(features)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise ValueError(
                f"KCenterGreedy.select: expected a non-empty (M, D) array, got shape {feats.shape}"
            )
        if not np.isfinite(feats).all():
            raise ValueError("KCenterGreedy.select: features contain NaN or infinite values")
        num = feats.shape[0]
        count = max(1, int(num * self.ratio)) if n is None else int(n)
        if count < 1:
            raise ValueError(f"KCenterGreedy.select: n must be >= 1, got {n}")
        count = min(count, num)
        proj = self.project(feats)
        sq_norms = np.einsum("ij,ij->i", proj, proj)
        picked = np.empty(count, dtype=np.int64)
        picked[0] = np.random.default_rng(self.seed).integers(num)
        min_sq = np.full(num, np.inf, dtype=np.float32)
        # The loop is one mat-vec per pick and bound by memory bandwidth: float32 halves the traffic and one
        # BLAS
        # thread is as fast as two (measured: 20k x 128 mat-vec 1.5 ms float32 vs 5.4 ms float64).
        with threadpool_limits(limits=1, user_api="blas"):
            for i in range(1, count):
                last = picked[i - 1]
                # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one mat-vec instead of an (M, d) difference array
                sq = sq_norms - 2.0 * (proj @ proj[last]) + sq_norms[last]
                np.minimum(min_sq, sq, out=min_sq)
                min_sq[last] = -1.0  # picked rows stay at -1: rounding can never make one look far again
                picked[i] = int(np.argmax(min_sq))
        return picked
