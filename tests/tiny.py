"""A tiny detector configuration and sensor-like part scans shared by the detector, verifier, pipeline and CLI
tests.

Tiny on purpose: these tests pin plumbing (save/load, subset equality, exit codes, report contents), not
accuracy, so a
two-block backbone trained for a few steps keeps each module's fit to a second or two on 2 cores.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from detector.config import DetectorConfig
from detector.pointmae_config import PointMAEConfig
from scans.parts import part_mesh, sample_surface, scan_like

TINY = PointMAEConfig(
    width=32,
    depth=2,
    heads=2,
    decoder_depth=1,
    decoder_heads=2,
    embed_dims=(16, 32, 32),
    group_size=16,
    num_groups=16,
    inference_groups=64,
    feature_layers=(0, 1),
    drop_path=0.0,
)
TINY_FIT = DetectorConfig(
    backbone=TINY, train_steps=3, train_batch=2, bank_views=2, coreset_ratio=0.5, seed=0, register=False
)


def part_scans(count: int, points: int, seed: int, part: str = "bracket") -> list[np.ndarray]:
    """Sensor-like scans of one procedural part (fresh surface sampling, noise and pose per scan)."""
    mesh = part_mesh(part)
    out = []
    for i in range(count):
        clean, normals = sample_surface(mesh, points, seed=seed + i)
        out.append(scan_like(clean, normals, seed=seed + 100 + i)[0].astype(np.float32))
    return out


# tests/test_pointmae*.py: a backbone trained on spheres (conftest's `trained`)
SPHERE_BACKBONE = replace(TINY, embed_dims=(16, 16, 32), inference_groups=32, drop_path=0.1)


def sphere(n: int, seed: int, radius: float = 5.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    return (radius * v / np.linalg.norm(v, axis=1, keepdims=True) + [1.0, -2.0, 3.0]).astype(np.float32)
