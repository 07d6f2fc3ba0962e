"""Memory bank and k-center coreset: exactness of subset scoring, persistence, metadata checks, IVF recall."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detector.bank import BANK_VERSION, BankError, BankMetadataError, MemoryBank
from detector.sampling import KCenterGreedy


# ----------------------------------------------------------------------------------------------- helpers
def brute_force_kcenter(points: np.ndarray, count: int, start: int) -> list[int]:
    """Textbook greedy k-center: full pairwise distance matrix, pick the row farthest from the chosen set."""
    pairwise = np.sqrt(((points[:, None, :].astype(np.float64) - points[None, :, :]) ** 2).sum(-1))
    chosen = [start]
    while len(chosen) < count:
        nearest_chosen = pairwise[:, chosen].min(axis=1)
        chosen.append(int(np.argmax(nearest_chosen)))
    return chosen


def brute_force_nn(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive float64 nearest neighbour (|q|^2 - 2 q.b + |b|^2 is exact to ~1e-12 in float64)."""
    q, b = queries.astype(np.float64), bank.astype(np.float64)
    sq = (q * q).sum(1)[:, None] - 2 * q @ b.T + (b * b).sum(1)[None, :]
    return np.sqrt(np.maximum(sq.min(axis=1), 0)), sq.argmin(axis=1)


def clustered(rng: np.random.Generator, n: int, dim: int, n_clusters: int, centres: np.ndarray | None = None):
    """Gaussian-mixture features: patch features cluster by part region, unlike i.i.d. noise."""
    if centres is None:
        centres = rng.normal(0, 1, (n_clusters, dim)).astype(np.float32)
    labels = rng.integers(0, len(centres), n)
    return (centres[labels] + rng.normal(0, 0.25, (n, dim))).astype(np.float32), centres


# ------------------------------------------------------------------------------------------- k-center greedy
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_kcenter_matches_brute_force_on_raw_features(rng, seed):
    feats = rng.normal(size=(150, 16)).astype(np.float32)
    sampler = KCenterGreedy(ratio=0.2, seed=seed, projection_dim=None)
    picks = sampler.select(feats)
    assert len(picks) == 30
    assert picks.tolist() == brute_force_kcenter(feats, 30, start=int(picks[0]))
    assert picks[0] == np.random.default_rng(seed).integers(150)  # the seed fixes the first pick


def test_kcenter_matches_brute_force_on_projected_features(rng):
    feats = rng.normal(size=(120, 300)).astype(np.float32)
    sampler = KCenterGreedy(ratio=0.25, seed=3, projection_dim=32)
    projected = sampler.project(feats)
    assert projected.shape == (120, 32)
    picks = sampler.select(feats)
    assert picks.tolist() == brute_force_kcenter(projected, 30, start=int(picks[0]))


def test_kcenter_is_deterministic_and_unique(rng):
    feats = rng.normal(size=(500, 200)).astype(np.float32)
    a = KCenterGreedy(0.1, seed=5).select(feats)
    b = KCenterGreedy(0.1, seed=5).select(feats)
    c = KCenterGreedy(0.1, seed=6).select(feats)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(np.unique(a)) == len(a) == 50
    assert len(KCenterGreedy(0.1, seed=5).select(feats, n=7)) == 7


def test_kcenter_covers_outliers(rng):
    """The reason for k-center: a rare pattern is kept even when it is 1 row among hundreds of
    near-duplicates."""
    feats = rng.normal(0, 0.01, size=(400, 8)).astype(np.float32)
    feats[123] += 5.0
    assert 123 in KCenterGreedy(0.01, seed=0, projection_dim=None).select(feats)[:2].tolist()


def test_kcenter_rejects_bad_input():
    with pytest.raises(ValueError, match="ratio"):
        KCenterGreedy(0.0)
    with pytest.raises(ValueError, match="NaN"):
        KCenterGreedy(0.5).select(np.array([[0.0, np.nan]]))


# ---------------------------------------------------------------------------------------------- bank scoring
@pytest.fixture
def fitted_flat(rng) -> tuple[MemoryBank, np.ndarray, np.ndarray]:
    train, centres = clustered(rng, 800, 96, 12)
    test, _ = clustered(rng, 300, 96, 12, centres)
    bank = MemoryBank(backbone_hash="abc123", chunk_rows=64)
    picked = bank.fit(train, coreset_ratio=0.1, seed=0)
    return bank, picked, np.vstack([test, train[:50]])


def test_fit_returns_bank_rows(fitted_flat, rng):
    bank, picked, _ = fitted_flat
    assert len(bank) == len(picked) == 80 and bank.meta["index"] == "flat"
    train, _ = clustered(np.random.default_rng(12345), 800, 96, 12)  # the fixture's training matrix again
    assert np.array_equal(bank.features, train[picked])


def test_score_matches_brute_force(fitted_flat):
    bank, _, test = fitted_flat
    dist, nn_idx = bank.score(test)
    ref_dist, ref_idx = brute_force_nn(test, bank.features)
    assert np.array_equal(nn_idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=1e-5)
    assert dist.dtype == np.float32 and nn_idx.dtype == np.int64


@pytest.mark.parametrize("size", [1, 7, 19, 20, 102, 250])
def test_subset_scoring_equals_full_scoring_exactly(fitted_flat, rng, size):
    bank, _, test = fitted_flat
    full_dist, full_idx = bank.score(test)
    subset = rng.choice(len(test), size, replace=False)
    sub_dist, sub_idx = bank.score(test[subset])
    assert np.array_equal(sub_dist, full_dist[subset])  # bitwise, not approximately
    assert np.array_equal(sub_idx, full_idx[subset])


def test_chunk_size_does_not_change_scores(fitted_flat, tmp_path):
    bank, _, test = fitted_flat
    ref = bank.score(test)
    bank.chunk_rows = 1000
    assert all(np.array_equal(a, b) for a, b in zip(ref, bank.score(test)))
    np.save(tmp_path / "test.npy", test)  # a memory-mapped input is scored chunk by chunk
    mapped = np.load(tmp_path / "test.npy", mmap_mode="r")
    assert all(np.array_equal(a, b) for a, b in zip(ref, bank.score(mapped)))


def test_thread_count_does_not_change_scores(fitted_flat):
    bank, _, test = fitted_flat
    many = np.vstack([test] * 3)  # enough rows for score() to use two threads
    two = bank.score(many)
    bank.threads = 1
    assert all(np.array_equal(a, b) for a, b in zip(two, bank.score(many)))


def test_score_rejects_wrong_width_and_takes_empty_input(fitted_flat):
    bank, _, _ = fitted_flat
    dist, nn_idx = bank.score(np.zeros((0, 96), np.float32))
    assert dist.shape == nn_idx.shape == (0,)
    with pytest.raises(ValueError, match="width 5"):
        bank.score(np.zeros((3, 5), np.float32))


def test_max_bank_caps_size(rng):
    feats = rng.normal(size=(400, 16)).astype(np.float32)
    bank = MemoryBank()
    assert len(bank.fit(feats, coreset_ratio=0.5, max_bank=30)) == 30
    assert len(bank.fit(feats, coreset_ratio=1.0)) == 400


def test_object_score_follows_patchcore(fitted_flat):
    bank, _, test = fitted_flat
    dist, nn_idx = bank.score(test)
    assert bank.object_score(test, dist, nn_idx, k=1) == pytest.approx(dist.max())
    # PatchCore eq. 7: s = (1 - exp|m_test - m*| / sum_{m in N_b(m*)} exp|m_test - m|) * s*
    worst = int(np.argmax(dist))
    m_star = int(nn_idx[worst])
    to_bank = np.linalg.norm(bank.features.astype(np.float64) - bank.features[m_star], axis=1)
    support = np.argsort(to_bank, kind="stable")[:3]  # m* itself (distance 0) and its 2 nearest bank rows
    assert support[0] == m_star
    d = np.linalg.norm(bank.features[support].astype(np.float64) - test[worst], axis=1)
    expected = (1 - np.exp(d[0]) / np.exp(d).sum()) * dist[worst]
    assert bank.object_score(test, dist, nn_idx, k=3) == pytest.approx(expected, rel=1e-5)
    assert 0 < bank.object_score(test, dist, nn_idx, k=3) <= dist.max()


# ------------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip(fitted_flat, tmp_path):
    bank, picked, test = fitted_flat
    bank.save(tmp_path / "bank", meta={"backbone": "h1", "feature": "pointmae"})
    loaded = MemoryBank.load(
        tmp_path / "bank", expect_dim=96, expect_meta={"backbone_hash": "abc123", "backbone": "h1"}
    )
    assert np.array_equal(loaded.features, bank.features) and np.array_equal(loaded.coreset_idx, picked)
    assert loaded.meta == bank.meta and loaded.extra_meta == {"backbone": "h1", "feature": "pointmae"}
    for a, b in zip(bank.score(test), loaded.score(test)):
        assert np.array_equal(a, b)
    loaded.save(tmp_path / "again")  # re-saving keeps the caller's keys
    assert (
        MemoryBank.load(tmp_path / "again", expect_meta={"backbone": "h1"}).extra_meta["feature"]
        == "pointmae"
    )
    assert not list((tmp_path / "bank").glob("*.tmp"))


def test_save_refuses_to_overwrite_own_keys(fitted_flat, tmp_path):
    bank, _, _ = fitted_flat
    with pytest.raises(ValueError, match="dim"):
        bank.save(tmp_path / "bank", meta={"dim": 3})


@pytest.mark.parametrize(
    ("kwargs", "key", "stored", "expected"),
    [
        ({"expect_dim": 128}, "dim", "96", "128"),
        ({"expect_meta": {"backbone_hash": "other"}}, "backbone_hash", "'abc123'", "'other'"),
        ({"expect_meta": {"feature_name": "fpfh"}}, "feature_name", "'pointmae'", "'fpfh'"),
    ],
)
def test_load_refuses_mismatched_metadata(fitted_flat, tmp_path, kwargs, key, stored, expected):
    bank, _, _ = fitted_flat
    folder = tmp_path / "bank_x"
    bank.save(folder)
    with pytest.raises(BankMetadataError) as err:
        MemoryBank.load(folder, **kwargs)
    message = str(err.value)
    assert str(folder) in message and key in message and stored in message and expected in message


def test_load_refuses_other_version_and_damaged_folders(fitted_flat, tmp_path):
    bank, _, _ = fitted_flat
    folder = tmp_path / "bank"
    bank.save(folder)
    meta = json.loads((folder / "bank.json").read_text())
    (folder / "bank.json").write_text(json.dumps({**meta, "version": BANK_VERSION + 1}))
    with pytest.raises(BankMetadataError, match=f"version is {BANK_VERSION + 1}"):
        MemoryBank.load(folder)
    (folder / "bank.json").write_text(json.dumps(meta))
    np.save(folder / "bank.npy", bank.features[:-1])
    with pytest.raises(BankError, match="bank.npy"):
        MemoryBank.load(folder)
    with pytest.raises(BankError, match=str(tmp_path / "nowhere")):
        MemoryBank.load(tmp_path / "nowhere")


def test_load_never_unpickles(fitted_flat, tmp_path):
    bank, _, _ = fitted_flat
    folder = tmp_path / "bank"
    bank.save(folder)
    np.save(folder / "coreset_idx.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BankError, match="coreset_idx.npy"):
        MemoryBank.load(folder)


# --------------------------------------------------------------------------------------------------- IVF
@pytest.fixture(scope="module")
def ivf_setup():
    rng = np.random.default_rng(99)
    train, centres = clustered(rng, 5000, 64, 60)
    bank = MemoryBank(ivf_threshold=1000, target_recall=0.99, chunk_rows=100)
    bank.fit(train, coreset_ratio=0.5, seed=0)
    queries, _ = clustered(rng, 400, 64, 60, centres)
    return bank, queries


def test_ivf_recall_against_exact(ivf_setup):
    bank, queries = ivf_setup
    assert bank.meta["index"] == "ivf"
    assert 1 <= bank.meta["nprobe"] < bank.meta["nlist"]  # it really prunes the search
    assert bank.meta["ivf_recall_measured"] >= 0.99
    _, approx_idx = bank.score(queries)
    _, exact_idx = brute_force_nn(queries, bank.features)
    assert np.mean(approx_idx == exact_idx) >= 0.95  # on fresh queries, not the calibration set


def test_ivf_subset_exact_and_round_trip(ivf_setup, tmp_path):
    bank, queries = ivf_setup
    full = bank.score(queries)
    subset = np.random.default_rng(1).choice(len(queries), 37, replace=False)
    sub = bank.score(queries[subset])
    assert np.array_equal(sub[0], full[0][subset]) and np.array_equal(sub[1], full[1][subset])
    bank.save(tmp_path / "ivf")
    loaded = MemoryBank.load(Path(tmp_path / "ivf"))
    assert loaded.meta["nprobe"] == bank.meta["nprobe"]
    for a, b in zip(full, loaded.score(queries)):
        assert np.array_equal(a, b)
