"""tools.detector: a fitted class round-trips through its folder, refuses foreign or broken folders, scores
subsets
exactly like the full scoring, is deterministic by seed, and detects a synthetic defect.

Fast tests use a tiny Point-MAE (width 32, 2 blocks, 64 patches of 16 points) trained for a few steps on
~3k-point
scans of a procedural part: the properties tested here (persistence, exactness, determinism, error handling)
do not
depend on the backbone being any good. Only the detection test trains a useful backbone and is marked slow.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from detector.config import DetectorConfig, FitError
from detector.fitted import FittedClass
from detector.fitting import fit_class
from detector.manifest import write_manifest
from detector.pointmae_config import PointMAEConfig
from scans.parts import part_mesh, sample_surface, scan_like
from tests.tiny import TINY, TINY_FIT, part_scans


@pytest.fixture(scope="module")
def train_scans() -> list[np.ndarray]:
    return part_scans(3, 3000, seed=0)


@pytest.fixture(scope="module")
def test_scan() -> np.ndarray:
    return part_scans(1, 3500, seed=50)[0]


@pytest.fixture(scope="module")
def fitted(train_scans) -> FittedClass:
    return fit_class(train_scans, TINY_FIT)


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory) -> Path:
    return fitted.save(tmp_path_factory.mktemp("fits") / "bracket")


def full_scores(fitted: FittedClass, scan: np.ndarray):
    analysis = fitted.analyse(scan)
    return analysis, fitted.score(analysis)


# ------------------------------------------------------------------------------------------------ round trip
def test_fit_records_what_it_fitted(fitted, train_scans):
    info = fitted.info
    assert info["n_train"] == 3
    assert info["n_train_patches"] == 3 * TINY_FIT.bank_views * TINY.inference_groups
    assert info["bank_size"] == len(fitted.bank) == int(info["n_train_patches"] * TINY_FIT.coreset_ratio)
    # leave-one-template-out thresholds of normal patches are ordered quantiles
    t = fitted.thresholds
    assert 0 < t["patch_p5"] <= t["patch_p50"] <= t["patch_p95"] <= t["patch_p99"] <= t["patch_max"]


def test_save_load_round_trip_gives_identical_scores(fitted, saved, test_scan):
    loaded = FittedClass.load(saved)
    assert loaded.backbone_id() == fitted.backbone_id()
    assert loaded.config == fitted.config and loaded.thresholds == fitted.thresholds
    a1, s1 = full_scores(fitted, test_scan)
    a2, s2 = full_scores(loaded, test_scan)
    np.testing.assert_array_equal(a1.patches.features, a2.patches.features)
    np.testing.assert_array_equal(s1.point_scores, s2.point_scores)
    np.testing.assert_array_equal(s1.patch_scores, s2.patch_scores)
    assert s1.object_score == s2.object_score
    for name in a1.point_stats:
        np.testing.assert_array_equal(a1.point_stats[name], a2.point_stats[name])


def test_save_replaces_an_old_fit_and_leaves_no_temporaries(fitted, tmp_path):
    target = tmp_path / "cls"
    fitted.save(target)
    fitted.save(target)  # over an existing fit
    assert FittedClass.load(target).backbone_id() == fitted.backbone_id()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls"]


def test_save_refuses_to_overwrite_a_folder_that_is_not_a_fit(fitted, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FitError, match="not a fitted class folder"):
        fitted.save(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


# ---------------------------------------------------------------------------------------------- load refusals
def test_load_refuses_a_bank_from_another_backbone(fitted, saved, train_scans, tmp_path):
    other = fit_class(train_scans, replace(TINY_FIT, seed=1))
    assert other.backbone_id() != fitted.backbone_id()
    mixed = tmp_path / "mixed"
    shutil.copytree(saved, mixed)
    shutil.rmtree(mixed / "bank")
    other.bank.save(mixed / "bank")
    write_manifest(mixed)  # consistent (not damaged), only mixed up: the bank's own check must refuse it
    with pytest.raises(FitError, match="backbone_hash") as err:
        FittedClass.load(mixed)
    assert str(mixed) in str(err.value)


def test_load_refuses_an_edited_backbone_hash(saved, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    meta = json.loads((edited / "fitted.json").read_text())
    meta["backbone_id"] = "0" * 64
    (edited / "fitted.json").write_text(json.dumps(meta))
    write_manifest(edited)
    with pytest.raises(FitError, match="another backbone") as err:
        FittedClass.load(edited)
    assert str(edited) in str(err.value)


@pytest.mark.parametrize("damage", ["missing", "not json", "a list", "no scale", "other version"])
def test_load_refuses_a_missing_or_garbled_fitted_json(saved, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    meta_path = broken / "fitted.json"
    meta = json.loads(meta_path.read_text())
    if damage == "missing":
        meta_path.unlink()
    elif damage == "not json":
        meta_path.write_text('{"format": "scanagent-fitted-class", "vers')
    elif damage == "a list":
        meta_path.write_text("[1, 2]")
    elif damage == "no scale":
        del meta["scale"]
        meta_path.write_text(json.dumps(meta))
    else:
        meta["version"] = 999
        meta_path.write_text(json.dumps(meta))
    if damage != "missing":
        write_manifest(broken)  # sealed again: the garbled content itself must be refused, not only the hash
    with pytest.raises(FitError) as err:
        FittedClass.load(broken)
    assert str(broken) in str(err.value)


def test_load_refuses_a_folder_without_bank(saved, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(saved, partial)
    shutil.rmtree(partial / "bank")
    with pytest.raises(FitError, match="bank"):
        FittedClass.load(partial)


# ----------------------------------------------------------------------------------------------- subset
# scoring
def test_scoring_given_points_equals_full_scoring_on_them(fitted, test_scan):
    analysis, full = full_scores(fitted, test_scan)
    # a region, as the verifier asks: the 20% of points nearest to one point, given unsorted
    order = np.argsort(np.linalg.norm(test_scan - test_scan[123], axis=1))
    ids = np.random.default_rng(3).permutation(order[: len(test_scan) // 5])
    part = fitted.score(analysis, ids)
    np.testing.assert_array_equal(part.point_ids, np.sort(ids))
    np.testing.assert_array_equal(part.point_scores, full.point_scores[part.point_ids])
    np.testing.assert_array_equal(part.patch_scores, full.patch_scores[part.patch_ids])
    assert part.patch_ids.size < analysis.n_patches  # only the supporting patches were searched


def test_scoring_given_patches_equals_full_scoring_on_them(fitted, test_scan):
    analysis, full = full_scores(fitted, test_scan)
    centres = analysis.patches.centers
    nearby = np.argsort(np.linalg.norm(centres - centres[7], axis=1))[: analysis.n_patches // 4]  # a region
    patch_ids = np.random.default_rng(4).permutation(nearby)
    part = fitted.score(analysis, patch_ids=patch_ids)
    np.testing.assert_array_equal(part.patch_ids, np.sort(patch_ids))
    np.testing.assert_array_equal(part.patch_scores, full.patch_scores[part.patch_ids])
    assert part.point_ids.size > 0
    np.testing.assert_array_equal(part.point_scores, full.point_scores[part.point_ids])
    # every returned point is decided by the searched patches alone
    support = analysis.support_of(part.point_ids)
    assert np.isin(support, part.patch_ids).all()


def test_scoring_rejects_bad_ids(fitted, test_scan):
    analysis = fitted.analyse(test_scan)
    with pytest.raises(IndexError):
        fitted.score(analysis, np.array([len(test_scan)]))
    with pytest.raises(IndexError):
        fitted.score(analysis, patch_ids=np.array([-1]))
    with pytest.raises(ValueError, match="not both"):
        fitted.score(analysis, np.array([0]), patch_ids=np.array([0]))
    empty = fitted.score(analysis, np.array([], dtype=np.int64))
    assert empty.point_ids.size == 0 and empty.patch_ids.size == 0


def test_score_full_matches_analyse_then_score(fitted, test_scan):
    per_point, obj = fitted.score_full(test_scan)
    _, full = full_scores(fitted, test_scan)
    np.testing.assert_array_equal(per_point, full.point_scores)
    assert obj == full.object_score and np.isfinite(per_point).all() and (per_point >= 0).all()


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_scores_other_seed_other_scores(fitted, train_scans, test_scan):
    again = fit_class(train_scans, TINY_FIT)
    _, a = full_scores(fitted, test_scan)
    _, b = full_scores(again, test_scan)
    np.testing.assert_allclose(b.point_scores, a.point_scores, rtol=0, atol=1e-6)
    assert abs(a.object_score - b.object_score) <= 1e-6
    other = fit_class(train_scans, replace(TINY_FIT, seed=7))
    _, c = full_scores(other, test_scan)
    assert np.abs(c.point_scores - a.point_scores).max() > 1e-3


# ------------------------------------------------------------------------------------------------------- BTF
def test_btf_fits_saves_and_scores(train_scans, test_scan, tmp_path):
    btf = fit_class(train_scans, replace(TINY_FIT, feature="fpfh"))
    assert btf.backbone is None and btf.backbone_id() == "fpfh-v1"
    assert btf.bank.features.shape[1] == 33  # FPFH width
    loaded = FittedClass.load(btf.save(tmp_path / "btf"))
    s1, o1 = btf.score_full(test_scan)
    s2, o2 = loaded.score_full(test_scan)
    np.testing.assert_array_equal(s1, s2)
    assert o1 == o2 and np.isfinite(s1).all() and s1.max() > 0
    assert "recon_error" not in btf.analyse(test_scan).point_stats


# ------------------------------------------------------------------------------------------------ bad input
def test_too_few_points_names_the_scan(train_scans):
    tiny = train_scans[1][:40]
    with pytest.raises(FitError, match="right_side.pcd: has 40 points"):
        fit_class([train_scans[0], tiny], TINY_FIT, names=["left.pcd", "right_side.pcd"])


def test_non_finite_or_misshapen_scans_name_the_scan(train_scans):
    bad = train_scans[0].copy()
    bad[5, 1] = np.nan
    with pytest.raises(FitError, match="scan 1: contains NaN"):
        fit_class([train_scans[0], bad], TINY_FIT, names=["scan 0", "scan 1"])
    with pytest.raises(FitError, match=r"flat\.npy: expected an \(N, 3\)"):
        fit_class([train_scans[0][:, :2]], TINY_FIT, names=["flat.npy"])
    with pytest.raises(FitError, match="no training scans"):
        fit_class([], TINY_FIT)


def test_init_backbone_of_another_architecture_is_refused(fitted, train_scans):
    other = replace(TINY_FIT, backbone=replace(TINY, width=64))
    with pytest.raises(FitError, match="another architecture"):
        fit_class(train_scans, other, init_backbone=fitted.backbone)


# ------------------------------------------------------------------------------------------- detection (slow)
@pytest.mark.slow
def test_bulges_score_higher_than_the_normal_surface():
    """A useful detector: on a procedural part with a bulge (evals.defects), the defect's points outscore the
    rest.

    The bar (mean P-AUROC > 0.8 over two bulges) is far above chance (0.5); the backbone is a reduced one (96
    wide,
    3 blocks, 60 steps) so the test runs in well under a minute. Point-level AUROC of a smooth bulge is capped
    well
    below 1 by its labels: every point moved by more than 10% of the peak height counts as anomalous, and the
    gently sloped rim is locally indistinguishable from normal surface."""
    from sklearn.metrics import roc_auc_score

    from scans.defects import make_defect
    from scans.parts import extent

    part = "shaft"
    mesh = part_mesh(part)
    config = DetectorConfig(
        backbone=PointMAEConfig(
            width=96,
            depth=3,
            heads=4,
            decoder_depth=1,
            decoder_heads=4,
            embed_dims=(32, 64, 96),
            inference_groups=512,
            feature_layers=(0, 2),
        ),
        train_steps=60,
        bank_views=2,
        seed=0,
    )
    fitted = fit_class(part_scans(4, 12000, seed=10, part=part), config)
    aurocs = []
    for defect_seed in (5, 6):
        clean, normals = sample_surface(mesh, 12000, seed=99 + defect_seed)
        size = extent(clean)
        bulged, mask, _ = make_defect(clean, normals, "bulge", seed=defect_seed, share=0.04, scale=size)
        test, _ = scan_like(bulged, normals, seed=199, scale=size)
        scores, _ = fitted.score_full(test.astype(np.float32))
        assert mask.any() and not mask.all()
        aurocs.append(roc_auc_score(mask, scores))
    assert np.mean(aurocs) > 0.8, aurocs
