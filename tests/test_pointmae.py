"""Point-MAE backbone: geometry primitives against numpy references, persistence, determinism, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.features import PatchFeatures, extract_patch_features
from detector.grouping import covering_masks, estimate_scale, group_scan
from detector.interpolation import interpolate_to_points
from detector.pointmae import (
    PointMAE,
    PointMAEConfig,
    backbone_hash,
    chamfer_l2_per_patch,
    group_points,
    load_backbone,
    save_backbone,
)
from detector.pointmae_runtime import OnnxBackbone, onnx_backbone
from detector.pointmae_train import train_pointmae
from tests.tiny import SPHERE_BACKBONE as TINY
from tests.tiny import sphere


# ---------------------------------------------------------------------------------- primitives vs numpy
def numpy_fps(points: np.ndarray, n: int, start: int) -> list[int]:
    chosen = [start]
    for _ in range(n - 1):
        d = np.min(((points[:, None, :] - points[None, chosen, :]) ** 2).sum(-1), axis=1)
        chosen.append(int(np.argmax(d)))
    return chosen


def test_grouping_fps_and_knn_match_bruteforce_numpy() -> None:
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(60, 3)).astype(np.float32)
    neighborhood, centers, idx, center_idx = group_scan(pts, 12, 5, start=17)
    assert center_idx.tolist() == numpy_fps(pts.astype(np.float64), 12, 17)
    d = ((centers[:, None] - pts[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1)[:, :5])
    np.testing.assert_allclose(neighborhood + centers[:, None], pts[idx], atol=1e-6)


def test_training_groups_as_inference_does() -> None:
    """The torch batch grouping is the numpy grouping of each scan (one FPS, one kNN)."""
    pts = np.random.default_rng(6).normal(size=(2, 100, 3)).astype(np.float32)
    neighborhood, centers, idx, center_idx = group_points(torch.from_numpy(pts), 8, 5, torch.tensor([0, 40]))
    for b, start in enumerate((0, 40)):
        ref = group_scan(pts[b], 8, 5, start)
        np.testing.assert_array_equal(idx[b].numpy(), ref[2])
        np.testing.assert_array_equal(center_idx[b].numpy(), ref[3])
        np.testing.assert_allclose(neighborhood[b].numpy(), ref[0], atol=1e-6)
    np.testing.assert_array_equal(idx[:, :, 0], center_idx)  # a centre's nearest point is itself


def test_chamfer_l2_matches_numpy() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(3, 8, 3)), rng.normal(size=(3, 6, 3))
    expected = []
    for p, q in zip(a, b):
        d = ((p[:, None] - q[None]) ** 2).sum(-1)
        expected.append(d.min(1).mean() + d.min(0).mean())
    got = chamfer_l2_per_patch(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert chamfer_l2_per_patch(torch.from_numpy(a), torch.from_numpy(a)).abs().max() == 0


@pytest.mark.parametrize("groups,ratio,rounds", [(10, 0.6, 2), (7, 0.3, 4), (512, 0.6, 2), (9, 0.2, 3)])
def test_covering_masks_hide_every_patch(groups: int, ratio: float, rounds: int) -> None:
    masks = covering_masks(groups, ratio, rounds, np.random.default_rng(0))
    assert masks.shape == (rounds, groups)
    assert masks.any(0).all()
    assert len(set(masks.sum(1).tolist())) == 1 and 0 < int(masks[0].sum()) < groups


def test_covering_masks_refuse_one_round() -> None:
    with pytest.raises(ValueError, match="cannot cover"):
        covering_masks(10, 0.6, 1, np.random.default_rng(0))


def test_interpolate_to_points_matches_bruteforce() -> None:
    rng = np.random.default_rng(7)
    centers, points, values = rng.normal(size=(20, 3)), rng.normal(size=(50, 3)), rng.normal(size=(20, 4))
    got = interpolate_to_points(points, centers, values)
    d2 = ((points[:, None] - centers[None]) ** 2).sum(-1)
    nn = np.argsort(d2, axis=1)[:, :3]
    w = 1 / (np.take_along_axis(d2, nn, 1) + 1e-8)
    expected = (w[..., None] * values[nn]).sum(1) / w.sum(1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    at_centres = interpolate_to_points(centers, centers, values[:, 0])
    np.testing.assert_allclose(at_centres, values[:, 0], atol=1e-4)


# ---------------------------------------------------------------------------------------- config
def test_config_json_round_trip_and_presets() -> None:
    for cfg in (PointMAEConfig.small(), PointMAEConfig.paper(), TINY):
        assert PointMAEConfig.from_json(cfg.to_json()) == cfg
    paper = PointMAEConfig.paper()
    assert (paper.width, paper.depth, paper.heads, paper.decoder_depth) == (384, 12, 6, 4)
    assert (paper.num_groups, paper.group_size, paper.mask_ratio, paper.feature_layers) == (
        64,
        32,
        0.6,
        (3, 7, 11),
    )
    with pytest.raises(ValueError, match="feature_layers"):
        PointMAEConfig(depth=2, feature_layers=(3,))


# --------------------------------------------------------------------------------------- features
def test_patch_features_shapes_and_coordinates(exported: OnnxBackbone) -> None:
    pts = sphere(3000, 9)
    pf = extract_patch_features(exported, pts, num_groups=32, group_size=16, seed=0, scale=5.0)
    assert isinstance(pf, PatchFeatures)
    assert pf.centers.shape == (32, 3) and pf.centers.dtype == np.float32
    assert pf.group_idx.shape == (32, 16) and pf.group_idx.dtype == np.int64
    assert pf.features.shape == (32, TINY.feature_dim) and pf.features.dtype == np.float32
    assert pf.recon_error.shape == (32,) and pf.recon_error.dtype == np.float32
    assert np.isfinite(pf.recon_error).all() and (pf.recon_error > 0).all()
    np.testing.assert_allclose(pf.feature_norm, np.linalg.norm(pf.features, axis=1), rtol=1e-5)
    assert pf.group_idx.min() >= 0 and pf.group_idx.max() < len(pts)
    # centres are input points (input coordinates, not normalised) and each is its own patch's first member
    np.testing.assert_array_equal(pf.centers, pts[pf.group_idx[:, 0]])
    assert len(np.unique(pf.group_idx[:, 0])) == 32


def test_extract_rejects_bad_input(exported: OnnxBackbone) -> None:
    with pytest.raises(ValueError, match="group_size"):
        extract_patch_features(exported, sphere(500, 0), num_groups=8, group_size=8, seed=0, scale=5.0)
    bad = sphere(500, 0)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        extract_patch_features(exported, bad, num_groups=8, group_size=16, seed=0, scale=5.0)


# ------------------------------------------------------------------------------------ persistence
def test_save_load_round_trip(trained: PointMAE, tmp_path: Path) -> None:
    save_backbone(trained, tmp_path / "bb")
    loaded = load_backbone(tmp_path / "bb", expect=TINY)
    assert backbone_hash(loaded) == backbone_hash(trained)
    pts = sphere(1500, 11)
    a = extract_patch_features(onnx_backbone(trained), pts, num_groups=32, group_size=16, seed=2, scale=5.0)
    b = extract_patch_features(onnx_backbone(loaded), pts, num_groups=32, group_size=16, seed=2, scale=5.0)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.recon_error, b.recon_error)
    assert sorted(p.name for p in (tmp_path / "bb").iterdir()) == ["config.json", "model.safetensors"]


def test_load_refuses_config_mismatch(trained: PointMAE, tmp_path: Path) -> None:
    save_backbone(trained, tmp_path)
    other = PointMAEConfig.from_json({**json.loads(TINY.to_json()), "mask_ratio": 0.5})
    with pytest.raises(ValueError, match=r"config mismatch \(mask_ratio: saved 0.6 != expected 0.5\)"):
        load_backbone(tmp_path, expect=other)


def test_load_refuses_tampered_tensors(trained: PointMAE, tmp_path: Path) -> None:
    save_backbone(trained, tmp_path)
    weights = tmp_path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x40  # flip a bit inside the last tensor's data
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors: tensor contents differ from the hash"):
        load_backbone(tmp_path)
    weights.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match="model.safetensors: unreadable tensor file"):
        load_backbone(tmp_path)


def test_load_refuses_missing_and_extra_tensors(trained: PointMAE, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_backbone(trained, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["extra.weight"] = torch.zeros(2)
    del tensors["head.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['head.bias'\], extra \['extra.weight'\]"):
        load_backbone(tmp_path)


def test_load_refuses_other_format_version(trained: PointMAE, tmp_path: Path) -> None:
    save_backbone(trained, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        load_backbone(tmp_path)


# --------------------------------------------------------------------------------- determinism, training
def test_training_is_deterministic_and_leaves_global_rng_alone() -> None:
    scans = [sphere(1500, 0), sphere(1500, 1)]
    state = torch.get_rng_state()
    a = train_pointmae(scans, TINY, steps=2, seed=5, batch_size=2, scale=5.0)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_pointmae(scans, TINY, steps=2, seed=5, batch_size=2, scale=5.0)
    c = train_pointmae(scans, TINY, steps=2, seed=6, batch_size=2, scale=5.0)
    assert backbone_hash(a) == backbone_hash(b) != backbone_hash(c)
    pts = sphere(1500, 3)
    fa = extract_patch_features(onnx_backbone(a), pts, num_groups=32, group_size=16, seed=1, scale=5.0)
    fb = extract_patch_features(onnx_backbone(b), pts, num_groups=32, group_size=16, seed=1, scale=5.0)
    np.testing.assert_allclose(fa.features, fb.features, atol=1e-6)
    np.testing.assert_allclose(fa.recon_error, fb.recon_error, atol=1e-6)


def test_init_must_match_config(trained: PointMAE) -> None:
    other = PointMAEConfig.from_json({**json.loads(TINY.to_json()), "width": 64})
    with pytest.raises(ValueError, match="different config"):
        train_pointmae([sphere(1500, 0)], other, steps=1, seed=0, init=trained, scale=5.0)


def test_estimate_scale_is_mean_radius() -> None:
    assert estimate_scale([sphere(500, 0, radius=2.0), sphere(500, 1, radius=4.0)]) == pytest.approx(
        3.0, rel=0.02
    )


@pytest.mark.slow
def test_twenty_steps_lower_the_reconstruction_loss() -> None:
    scans = [sphere(2000, 0), sphere(2000, 1)]
    cfg = PointMAEConfig.from_json({**json.loads(TINY.to_json()), "drop_path": 0.0})
    losses: list[float] = []
    before = train_pointmae(scans, cfg, steps=0, seed=0, scale=5.0)
    after = train_pointmae(
        scans, cfg, steps=20, seed=0, batch_size=4, scale=5.0, progress=lambda step, loss: losses.append(loss)
    )
    assert len(losses) == 20
    pts = sphere(2000, 9)

    def mean_recon(model: PointMAE) -> float:
        return float(
            np.mean(
                [
                    extract_patch_features(
                        onnx_backbone(model), pts, num_groups=32, group_size=16, seed=s, scale=5.0
                    ).recon_error.mean()
                    for s in range(3)
                ]
            )
        )

    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert mean_recon(after) < mean_recon(before)  # held-out scan, every patch masked once or more


def test_recon_rounds_zero_skips_reconstruction_only(exported: OnnxBackbone) -> None:
    pts = sphere(1500, 4)
    full = extract_patch_features(
        exported, pts, num_groups=32, group_size=16, seed=3, scale=5.0, recon_rounds=3
    )
    bare = extract_patch_features(
        exported, pts, num_groups=32, group_size=16, seed=3, scale=5.0, recon_rounds=0
    )
    np.testing.assert_array_equal(full.features, bare.features)
    np.testing.assert_array_equal(full.group_idx, bare.group_idx)
    assert np.isnan(bare.recon_error).all() and np.isfinite(full.recon_error).all()
