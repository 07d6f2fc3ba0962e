"""PatchCore memory bank: a k-center coreset of normal patch features behind a faiss index.

Scoring a patch = Euclidean distance to its nearest bank feature. Two properties the rest of the system leans on:

* Subset scoring is exact. The agent scores only the patches it asks about and the verifier (`--verify all`)
  scores every patch; both must agree bit for bit on shared patches. faiss's default flat search switches to a
  BLAS matrix product once a batch holds enough queries, and that changes the last bits of a distance with the
  batch's composition (measured: 5 queries alone vs the same 5 inside a batch of 600 differed by 2.4e-4). While
  scoring, this module therefore raises faiss's `distance_compute_blas_threshold` so every query is answered by
  faiss's per-query kernel: each row's result then depends only on that row and the bank, so
  `score(F[subset]) == score(F)[subset]` holds exactly, and cost is proportional to the rows given.
* Large banks use an IVF index (IndexIVFFlat). Its `nprobe` is calibrated at fit time: the training features
  that did not make the coreset are realistic queries, so the smallest nprobe whose recall against exact search
  reaches `target_recall` is kept, and the measured recall is stored in the metadata.

Files (no pickles): bank.npy (float32 coreset), coreset_idx.npy (rows of the training features it came from),
centroids.npy (IVF only; reloading rebuilds the identical index) and bank.json (metadata, written last so a
half-written folder never loads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from detector.sampling import KCenterGreedy
from scans import strict_json

__all__ = [
    "BANK_VERSION",
    "DEFAULT_IVF_THRESHOLD",
    "BankError",
    "BankMetadataError",
    "MemoryBank",
]

BANK_VERSION = 1
# Banks at least this large get an IVF index. Exact search costs ~bank rows x queries x dim: a 20k x 1152 bank
# answers a 512-patch scan in a few seconds on this box; IVF cuts that by about nlist / nprobe.
DEFAULT_IVF_THRESHOLD = 20_000
_META_FILE = "bank.json"
_CORE_KEYS = frozenset(
    {
        "format",
        "version",
        "feature_name",
        "backbone_hash",
        "dim",
        "n_bank",
        "n_train",
        "coreset_ratio",
        "max_bank",
        "seed",
        "index",
        "nlist",
        "nprobe",
        "ivf_recall_measured",
    }
)
_ROWS_PER_THREAD = 256  # score() adds a faiss thread per this many query rows, up to `threads`
_PER_QUERY = 2**30  # blas threshold above any batch size: forces faiss's per-query kernels


class BankError(ValueError):
    """A bank folder is missing, unreadable or inconsistent. The message starts with the folder."""


class BankMetadataError(BankError):
    """A bank was built for another backbone, feature, width or format version than the caller expects."""


@contextmanager
def _faiss_settings(threads: int, per_query: bool = True) -> Iterator[None]:
    """A fixed faiss thread count and (per_query) batch-independent search; restores the globals afterwards."""
    old_threshold = faiss.cvar.distance_compute_blas_threshold
    old_threads = faiss.omp_get_max_threads()
    if per_query:
        faiss.cvar.distance_compute_blas_threshold = _PER_QUERY
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old_threshold
        faiss.omp_set_num_threads(old_threads)


def _as_features(features: np.ndarray, dim: int | None, what: str, allow_empty: bool = False) -> np.ndarray:
    arr = features if isinstance(features, np.ndarray) else np.asarray(features)  # keeps np.memmap lazy
    if arr.ndim != 2 or (arr.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{what}: expected a non-empty (rows, dim) array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what}: features have width {arr.shape[1]} but the bank holds width {dim}")
    return arr


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.replace(tmp, path)


class MemoryBank:
    """Coreset of normal patch features with exact (flat) or calibrated IVF nearest-neighbour search.

    feature_name / backbone_hash: recorded in the metadata so a bank is never used with features from another
        extractor (checked by `load`).
    ivf_threshold: bank size from which an IVF index replaces exact search.
    target_recall: recall against exact search that the IVF nprobe calibration must reach.
    threads: most faiss OpenMP threads to use (score() uses one per 256 query rows, up to this); scores do not
        depend on it (per-query kernels). IVF k-means training may, which is why its centroids are saved: a
        reloaded bank is identical to the fitted one.
    chunk_rows: rows scored per faiss call, bounding memory for inputs of any length (np.memmap works).
    """

    def __init__(
        self,
        *,
        feature_name: str = "pointmae",
        backbone_hash: str = "",
        ivf_threshold: int = DEFAULT_IVF_THRESHOLD,
        target_recall: float = 0.99,
        threads: int = 2,
        chunk_rows: int = 4096,
    ) -> None:
        if not 0 < target_recall <= 1:
            raise ValueError(f"MemoryBank: target_recall must be in (0, 1], got {target_recall}")
        if threads < 1 or chunk_rows < 1 or ivf_threshold < 1:
            raise ValueError("MemoryBank: threads, chunk_rows and ivf_threshold must be >= 1")
        self.feature_name = feature_name
        self.backbone_hash = backbone_hash
        self.ivf_threshold = ivf_threshold
        self.target_recall = target_recall
        self.threads = threads
        self.chunk_rows = chunk_rows
        self.features: np.ndarray | None = None  # float32 (B, D) coreset
        self.coreset_idx: np.ndarray | None = None  # int64 (B,) rows of the training matrix
        self.centroids: np.ndarray | None = None  # float32 (nlist, D) for IVF
        self.meta: dict[str, Any] = {}  # the bank's own metadata (keys in _CORE_KEYS)
        self.extra_meta: dict[str, Any] = {}  # the caller's keys given to save(meta=...), kept through load
        self._index: faiss.Index | None = None
        self._quantizer: faiss.Index | None = None

    # ------------------------------------------------------------------ building
    def fit(
        self,
        features: np.ndarray,
        coreset_ratio: float = 0.1,
        seed: int = 0,
        max_bank: int | None = None,
    ) -> np.ndarray:
        """Select a k-center coreset of `features` (M, D) and index it.

        Returns the int64 rows of `features` that form the bank, in bank order (callers use them to trace a bank row
        back to its training scan). coreset_ratio: share of rows kept (1.0 keeps all rows, skipping selection);
        max_bank caps the count.
        """
        feats = _as_features(features, None, "MemoryBank.fit")
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if not np.isfinite(feats).all():
            raise ValueError("MemoryBank.fit: features contain NaN or infinite values")
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"MemoryBank.fit: coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if max_bank is not None and max_bank < 1:
            raise ValueError(f"MemoryBank.fit: max_bank must be >= 1, got {max_bank}")
        num = feats.shape[0]
        count = max(1, int(num * coreset_ratio))
        if max_bank is not None:
            count = min(count, max_bank)
        if count >= num:
            picked = np.arange(num, dtype=np.int64)
        else:
            picked = KCenterGreedy(coreset_ratio, seed=seed).select(feats, n=count)
        bank = np.ascontiguousarray(feats[picked])
        centroids = None
        nprobe, recall = 0, 1.0
        if len(bank) >= self.ivf_threshold:
            with _faiss_settings(
                self.threads, per_query=False
            ):  # k-means wants BLAS; its bits are saved anyway
                centroids = self._train_centroids(bank, seed)
        self._install(bank, picked, centroids, nprobe=1)
        if centroids is not None:
            nprobe, recall = self._calibrate_nprobe(feats, picked, seed)
            self._index.nprobe = nprobe
        self.extra_meta = {}
        self.meta = {
            "format": "scanagent-memory-bank",
            "version": BANK_VERSION,
            "feature_name": self.feature_name,
            "backbone_hash": self.backbone_hash,
            "dim": int(bank.shape[1]),
            "n_bank": int(bank.shape[0]),
            "n_train": int(num),
            "coreset_ratio": float(coreset_ratio),
            "max_bank": max_bank,
            "seed": int(seed),
            "index": "ivf" if centroids is not None else "flat",
            "nlist": 0 if centroids is None else len(centroids),
            "nprobe": int(nprobe),
            "ivf_recall_measured": float(recall),
        }
        return picked

    @staticmethod
    def _nlist_for(n_bank: int) -> int:
        """About sqrt(n) lists (k-means over 1000+-dim features is the fit's cost, so fewer than faiss's usual
        4 sqrt(n)), with at least 39 training points per list (faiss's k-means minimum)."""
        return int(max(1, min(int(np.sqrt(n_bank)), n_bank // 39)))

    def _train_centroids(self, bank: np.ndarray, seed: int) -> np.ndarray:
        kmeans = faiss.Kmeans(bank.shape[1], self._nlist_for(len(bank)), niter=10, seed=seed, verbose=False)
        kmeans.train(bank)
        return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)

    def _install(
        self, bank: np.ndarray, picked: np.ndarray, centroids: np.ndarray | None, nprobe: int
    ) -> None:
        """Build the faiss index for `bank` (identically in fit and load)."""
        dim = bank.shape[1]
        with _faiss_settings(self.threads):
            if centroids is None:
                index = faiss.IndexFlatL2(dim)
                self._quantizer = None
            else:
                self._quantizer = faiss.IndexFlatL2(dim)
                self._quantizer.add(centroids)
                index = faiss.IndexIVFFlat(self._quantizer, dim, len(centroids), faiss.METRIC_L2)
                index.nprobe = nprobe
            index.add(bank)
        self.features, self.coreset_idx, self.centroids, self._index = bank, picked, centroids, index

    def _calibrate_nprobe(self, train: np.ndarray, picked: np.ndarray, seed: int) -> tuple[int, float]:
        """Smallest power-of-two nprobe whose recall@1 on held-out training rows reaches target_recall."""
        rng = np.random.default_rng(seed)
        held_out = np.setdiff1d(np.arange(len(train)), picked)
        if len(held_out) == 0:  # every row is in the bank: probe with jittered bank rows instead
            base = self.features[rng.choice(len(self.features), min(500, len(self.features)), replace=False)]
            queries = base + rng.normal(0, 0.05 * float(base.std()), base.shape).astype(np.float32)
        else:
            queries = train[rng.choice(held_out, min(500, len(held_out)), replace=False)]
        exact = faiss.IndexFlatL2(self.features.shape[1])
        exact.add(self.features)
        with _faiss_settings(
            self.threads, per_query=False
        ):  # BLAS: fast, and the last bits do not matter here
            true_sq, _ = exact.search(queries, 1)
        with _faiss_settings(self.threads):
            nlist = len(self.centroids)
            nprobe, recall = 1, 0.0
            while True:
                self._index.nprobe = nprobe
                approx_sq, _ = self._index.search(queries, 1)
                # a hit = found a neighbour as close as the exact one (ties at equal distance count)
                recall = float(np.mean(approx_sq[:, 0] <= true_sq[:, 0] * (1 + 1e-5) + 1e-12))
                if recall >= self.target_recall or nprobe >= nlist:
                    return nprobe, recall
                nprobe = min(nprobe * 2, nlist)

    # ------------------------------------------------------------------ scoring
    def _require_fitted(self) -> None:
        if self._index is None or self.features is None:
            raise RuntimeError("MemoryBank: fit() or load() first")

    def score(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest-bank distance of each row: (dist float32 (G,) Euclidean, nn_idx int64 (G,) bank rows).

        Rows are processed in chunks of `chunk_rows`; each row's result depends only on that row, so scoring a
        subset gives exactly the same numbers as scoring everything and indexing.
        """
        self._require_fitted()
        feats = _as_features(features, self.features.shape[1], "MemoryBank.score", allow_empty=True)
        dist = np.empty(len(feats), dtype=np.float32)
        nn_idx = np.empty(len(feats), dtype=np.int64)
        # Small batches run on one thread: waking an OpenMP team costs more than it saves on a shared 2-core box
        # (measured under load: 102 rows took 2.8 ms on 1 thread, 10-30 ms on 2). Results do not depend on it.
        threads = max(1, min(self.threads, len(feats) // _ROWS_PER_THREAD))
        with _faiss_settings(threads):
            for start in range(0, len(feats), self.chunk_rows):
                chunk = np.ascontiguousarray(feats[start : start + self.chunk_rows], dtype=np.float32)
                if not np.isfinite(chunk).all():
                    raise ValueError(
                        f"MemoryBank.score: non-finite values in rows {start}..{start + len(chunk)}"
                    )
                sq, idx = self._index.search(chunk, 1)
                dist[start : start + len(chunk)] = np.sqrt(np.maximum(sq[:, 0], 0.0))
                nn_idx[start : start + len(chunk)] = idx[:, 0]
        return dist, nn_idx

    def object_score(self, features: np.ndarray, dist: np.ndarray, nn_idx: np.ndarray, k: int = 3) -> float:
        """PatchCore's object score: the largest patch distance s*, down-weighted when its nearest bank feature m*
        sits in a dense part of the bank.

        With m_test the most anomalous patch and N_k(m*) the k nearest bank features of m* (m* first), the weight is
        1 - softmax_j(|m_test - n_j|)[m*]: if m_test is about as close to m*'s neighbours as to m* itself, the
        region is well covered and the score shrinks; k=1 returns s* unchanged.
        """
        self._require_fitted()
        feats = _as_features(features, self.features.shape[1], "MemoryBank.object_score")
        dist, nn_idx = np.asarray(dist), np.asarray(nn_idx)
        if dist.shape != (len(feats),) or nn_idx.shape != (len(feats),):
            raise ValueError(
                f"MemoryBank.object_score: dist {dist.shape} and nn_idx {nn_idx.shape} must be ({len(feats)},)"
            )
        if k < 1:
            raise ValueError(f"MemoryBank.object_score: k must be >= 1, got {k}")
        worst = int(np.argmax(dist))
        s_star = float(dist[worst])
        k = min(k, len(self.features))
        if k == 1:
            return s_star
        m_star = int(nn_idx[worst])
        with _faiss_settings(self.threads):
            _, support = self._index.search(self.features[m_star : m_star + 1], k + 1)
        others = [int(j) for j in support[0] if j >= 0 and j != m_star][: k - 1]
        neighbours = self.features[[m_star, *others]].astype(np.float64)
        d = np.linalg.norm(neighbours - np.asarray(feats[worst], dtype=np.float64), axis=1)
        soft = np.exp(-(d.max() - d))  # softmax with the max subtracted, for stability
        soft /= soft.sum()
        return float((1.0 - soft[0]) * s_star)

    def __len__(self) -> int:
        return 0 if self.features is None else len(self.features)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> None:
        """Write the bank into `directory` (created if needed); each file is replaced atomically, json last.

        meta: extra json-serialisable keys stored beside the bank's own (e.g. the detector's backbone id) and
        checked by `load(expect_meta=...)`; they may not overwrite the bank's own keys.
        """
        self._require_fitted()
        extra = {**self.extra_meta, **dict(meta or {})}
        clash = sorted(set(extra) & _CORE_KEYS)
        if clash:
            raise ValueError(f"MemoryBank.save: extra metadata may not overwrite the bank's own keys {clash}")
        try:
            meta_text = strict_json.dumps({**self.meta, **extra}, what=f"{directory}/{_META_FILE}", indent=2,
                                          sort_keys=True)
        except TypeError as exc:
            raise ValueError(f"MemoryBank.save: metadata is not json-serialisable: {exc}") from exc
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _META_FILE).unlink(missing_ok=True)  # a crash below leaves a folder that refuses to load
        _atomic_save_npy(folder / "bank.npy", self.features)
        _atomic_save_npy(folder / "coreset_idx.npy", self.coreset_idx)
        if self.centroids is not None:
            _atomic_save_npy(folder / "centroids.npy", self.centroids)
        tmp = folder / (_META_FILE + ".tmp")
        tmp.write_text(meta_text)
        os.replace(tmp, folder / _META_FILE)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        expect_dim: int | None = None,
        expect_meta: Mapping[str, Any] | None = None,
        *,
        threads: int = 2,
        chunk_rows: int = 4096,
    ) -> MemoryBank:
        """Read a bank written by `save`, refusing one whose metadata differs from what the caller expects.

        Always checked: format version == BANK_VERSION and the arrays match the recorded shape. expect_dim and every
        key of expect_meta (e.g. {"backbone_hash": ..., "feature_name": ...}) must equal the stored values.
        """
        folder = Path(directory)
        meta_path = folder / _META_FILE
        if not meta_path.is_file():
            raise BankError(f"{folder}: no {_META_FILE} (not a memory bank, or an interrupted save)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BankError(f"{folder}: cannot read {_META_FILE}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != "scanagent-memory-bank":
            raise BankError(f"{folder}: {_META_FILE} is not memory-bank metadata")

        def mismatch(key: str, stored: Any, expected: Any) -> BankMetadataError:
            return BankMetadataError(
                f"{folder}: memory bank {key} is {stored!r} but {expected!r} was expected; refit the bank"
            )

        if meta.get("version") != BANK_VERSION:
            raise mismatch("version", meta.get("version"), BANK_VERSION)
        if expect_dim is not None and meta.get("dim") != expect_dim:
            raise mismatch("dim", meta.get("dim"), expect_dim)
        for key, expected in (expect_meta or {}).items():
            if meta.get(key) != expected:
                raise mismatch(key, meta.get(key), expected)

        def read(name: str) -> np.ndarray:
            try:
                return np.load(folder / name, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise BankError(f"{folder}: cannot read {name}: {exc}") from exc

        bank = read("bank.npy")
        picked = read("coreset_idx.npy")
        if bank.dtype != np.float32 or bank.shape != (meta.get("n_bank"), meta.get("dim")):
            raise BankError(
                f"{folder}: bank.npy is {bank.dtype} {bank.shape}, metadata says float32 "
                f"({meta.get('n_bank')}, {meta.get('dim')})"
            )
        if picked.shape != (len(bank),) or not np.issubdtype(picked.dtype, np.integer):
            raise BankError(f"{folder}: coreset_idx.npy has shape {picked.shape}, expected ({len(bank)},)")
        centroids = None
        if meta.get("index") == "ivf":
            centroids = read("centroids.npy")
            if centroids.dtype != np.float32 or centroids.shape != (meta.get("nlist"), meta.get("dim")):
                raise BankError(f"{folder}: centroids.npy has shape {centroids.shape}, metadata disagrees")
        if not np.isfinite(bank).all():
            raise BankError(f"{folder}: bank.npy contains NaN or infinite values")

        obj = cls(
            feature_name=str(meta.get("feature_name", "")),
            backbone_hash=str(meta.get("backbone_hash", "")),
            threads=threads,
            chunk_rows=chunk_rows,
        )
        obj._install(
            np.ascontiguousarray(bank), picked.astype(np.int64), centroids, nprobe=max(1, meta["nprobe"])
        )
        obj.meta = {key: value for key, value in meta.items() if key in _CORE_KEYS}
        obj.extra_meta = {key: value for key, value in meta.items() if key not in _CORE_KEYS}
        return obj
