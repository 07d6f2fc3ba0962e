"""Point-MAE as inference runs it: the exported ScanPass on onnxruntime against the torch model's own
training-time paths, and the checks a saved backbone folder passes before its graph is run (the tiny
backbone and its graph are conftest's `trained` and `exported`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.grouping import covering_masks, group_scan
from detector.pointmae import backbone_hash, save_backbone
from detector.pointmae_runtime import GRAPH_FILE, GRAPH_META, read_backbone
from tests.tiny import SPHERE_BACKBONE as TINY
from tests.tiny import sphere


def patches(groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    pts = sphere(1500, seed) / 5.0
    neighborhood, centers, _, _ = group_scan(pts, groups, TINY.group_size, start=seed)
    return neighborhood, centers


@pytest.mark.parametrize("groups,rounds", [(32, 2), (21, 3)])  # the patch and round counts are free axes
def test_graph_gives_what_the_torch_model_computes(trained, exported, groups: int, rounds: int) -> None:
    neighborhood, centers = patches(groups, seed=groups)
    masks = covering_masks(groups, TINY.mask_ratio, rounds, np.random.default_rng(0))
    visible = np.stack([np.flatnonzero(~m) for m in masks])
    masked = np.stack([np.flatnonzero(m) for m in masks])
    features, errors = exported.run(neighborhood, centers, visible, masked)
    with torch.no_grad():
        nb, ct = torch.from_numpy(neighborhood)[None], torch.from_numpy(centers)[None]
        tokens = trained.embed(nb)
        _, kept = trained.run_encoder(tokens, ct, TINY.feature_layers)
        want_features = torch.cat(kept, dim=-1)[0].numpy()
        want_errors = [
            trained.reconstruct_masked(tokens, nb, ct, torch.from_numpy(m)[None])[0].numpy() for m in masks
        ]
    np.testing.assert_allclose(features, want_features, atol=1e-4, rtol=1e-4)
    assert errors is not None and errors.shape == (rounds, masked.shape[1])
    np.testing.assert_allclose(errors, np.stack(want_errors), rtol=1e-3, atol=1e-7)
    alone, none = exported.run(neighborhood, centers)  # features only: the rounds are not run
    assert none is None
    np.testing.assert_array_equal(alone, features)


def test_saved_folder_reads_back_and_runs_the_same(exported, tmp_path: Path) -> None:
    exported.save(tmp_path / "bb")
    names = sorted(p.name for p in (tmp_path / "bb").iterdir())
    assert names == sorted(["config.json", GRAPH_FILE, GRAPH_META, "model.safetensors"])
    loaded = read_backbone(tmp_path / "bb", TINY, exported.identity)
    neighborhood, centers = patches(32, seed=5)
    want = exported.run(neighborhood, centers)[0]
    np.testing.assert_array_equal(loaded.run(neighborhood, centers)[0], want)
    loaded.save(tmp_path / "again")  # a backbone read from disk is saved by copying its weights
    assert backbone_hash(read_backbone(tmp_path / "again", TINY, exported.identity).torch_model()) == (
        exported.identity
    )


def test_folder_without_a_graph_is_exported_on_reading(trained, exported, tmp_path: Path) -> None:
    save_backbone(trained, tmp_path)  # a fit from before graphs were stored
    loaded = read_backbone(tmp_path, TINY, exported.identity)
    neighborhood, centers = patches(32, seed=6)
    want = exported.run(neighborhood, centers)[0]
    np.testing.assert_array_equal(loaded.run(neighborhood, centers)[0], want)
    assert not (tmp_path / GRAPH_FILE).exists()  # reading never writes into the user's folder


def test_reading_refuses_a_graph_that_is_not_the_banks(exported, tmp_path: Path) -> None:
    exported.save(tmp_path)
    graph, record = tmp_path / GRAPH_FILE, tmp_path / GRAPH_META
    with pytest.raises(ValueError, match="differs from the one the bank was built with"):
        read_backbone(tmp_path, TINY, "0" * 64)
    original = graph.read_bytes()
    graph.write_bytes(original[:-10] + b"0123456789")
    with pytest.raises(ValueError, match=f"{GRAPH_FILE}: contents differ from the sha256"):
        read_backbone(tmp_path, TINY, exported.identity)
    garbage = b"not an onnx graph"
    graph.write_bytes(garbage)
    meta = json.loads(record.read_text())
    record.write_text(json.dumps({**meta, "sha256": hashlib.sha256(garbage).hexdigest()}))
    with pytest.raises(ValueError, match="onnxruntime cannot load it"):
        read_backbone(tmp_path, TINY, exported.identity)
    graph.write_bytes(original)
    record.write_text(json.dumps({**meta, "backbone_hash": "f" * 64}))
    with pytest.raises(ValueError, match="exported from another backbone"):
        read_backbone(tmp_path, TINY, exported.identity)
    record.write_text("{")
    with pytest.raises(ValueError, match=f"{GRAPH_META}: unreadable"):
        read_backbone(tmp_path, TINY, exported.identity)
