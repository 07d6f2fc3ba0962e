"""Geometry helpers against brute-force numpy, registration on a real scan, and the BTF patch features."""

from __future__ import annotations

import numpy as np
import pytest

from detector.bank import MemoryBank
from detector.btf import btf_patch_features, btf_point_features
from scans.geometry import (
    curvature,
    estimate_normals,
    fpfh,
    fps,
    knn,
    register,
    roughness,
    voxel_downsample,
)
from scans.shared_data import shared_scans_dir

BUNNY = shared_scans_dir() / "stanford-bunny" / "bun000.ply"


def sphere(rng: np.random.Generator, n: int, radius: float = 1.0) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return radius * v / np.linalg.norm(v, axis=1, keepdims=True)


def tilted_plane(rng: np.random.Generator, n: int) -> np.ndarray:
    uv = rng.uniform(-1, 1, size=(n, 2))
    basis = np.linalg.qr(rng.normal(size=(3, 3)))[0][:, :2]  # a random plane through the origin
    return uv @ basis.T + np.array([0.3, -2.0, 5.0])


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


# --------------------------------------------------------------------------------------------- knn / fps
def test_knn_matches_brute_force(rng):
    pts, queries = rng.normal(size=(300, 3)), rng.normal(size=(40, 3))
    dist, idx = knn(pts, queries, 5)
    full = np.linalg.norm(queries[:, None] - pts[None], axis=2)
    ref_idx = np.argsort(full, axis=1)[:, :5]
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(
        dist, np.take_along_axis(full, ref_idx, 1), rtol=1e-6
    )  # Euclidean, not squared
    assert knn(pts, queries, 1)[1].shape == (40, 1)
    with pytest.raises(ValueError, match="k=301"):
        knn(pts, queries, 301)


def test_fps_matches_brute_force(rng):
    pts = rng.normal(size=(200, 3))
    picks = fps(pts, 25, seed=4)
    full = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    expected = [int(np.random.default_rng(4).integers(200))]
    while len(expected) < 25:
        expected.append(int(np.argmax(full[:, expected].min(axis=1))))
    assert picks.tolist() == expected
    assert not np.array_equal(fps(pts, 25, seed=5), picks)
    with pytest.raises(ValueError, match="n=201"):
        fps(pts, 201)


def test_voxel_downsample_keeps_the_point_nearest_each_voxel_mean(rng):
    pts = rng.uniform(0, 1, size=(500, 3))
    kept = voxel_downsample(pts, 0.25)
    cells: dict[tuple, list[int]] = {}
    for i, key in enumerate(map(tuple, np.floor((pts - pts.min(0)) / 0.25).astype(int))):
        cells.setdefault(key, []).append(i)
    expected = sorted(
        min(members, key=lambda i: (np.sum((pts[i] - pts[members].mean(0)) ** 2), i))
        for members in cells.values()
    )
    assert kept.tolist() == expected


# ------------------------------------------------------------------------------------ local shape statistics
def test_curvature_plane_is_flat_and_sphere_is_not(rng):
    plane_curv = curvature(tilted_plane(rng, 2000), k=20)
    assert plane_curv.max() < 1e-6
    sphere_curv = curvature(sphere(rng, 2000), k=20)
    assert sphere_curv.min() > 1e-4
    # same neighbourhood, brute force: smallest covariance eigenvalue over the eigenvalue sum
    pts = sphere(np.random.default_rng(1), 500)
    got = curvature(pts, k=15)
    for i in (0, 100, 499):
        nbrs = pts[np.argsort(np.linalg.norm(pts - pts[i], axis=1))[:15]]
        ev = np.linalg.eigvalsh(np.cov(nbrs.T))
        assert got[i] == pytest.approx(ev[0] / ev.sum(), rel=1e-4)


def test_roughness_sees_a_bump(rng):
    pts = tilted_plane(rng, 3000)
    assert roughness(pts, k=20).max() < 1e-9
    normal = np.cross(pts[1] - pts[0], pts[2] - pts[0])
    pts[0] += 0.05 * normal / np.linalg.norm(normal)
    rough = roughness(pts, k=20)
    assert int(np.argmax(rough)) == 0 and rough[0] > 0.03  # most of the 0.05 bump, in input units


def test_normals_on_a_sphere_point_outwards(rng):
    pts = sphere(rng, 3000, radius=2.0)
    normals = estimate_normals(pts, k=20)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-5)
    assert np.einsum("ij,ij->i", normals, pts / 2.0).min() > 0.98


def test_fpfh_histograms_are_normalised_and_pose_invariant(rng):
    pts = sphere(rng, 2000) * np.array([1.0, 0.7, 0.5])
    feat = fpfh(pts, radius_normal=0.15, radius_feature=0.4)
    assert feat.shape == (2000, 33) and feat.dtype == np.float32
    # open3d normalises each of the three 11-bin angle histograms, so every one has the same total mass
    sums = feat.reshape(-1, 3, 11).sum(axis=2)
    np.testing.assert_allclose(sums, sums[0, 0], rtol=1e-4)
    # with normals oriented outwards the descriptor does not depend on the pose
    turned = fpfh(
        pts @ rotation(np.array([0.3, -1.0, 2.0]), 70.0).T + 5.0, radius_normal=0.15, radius_feature=0.4
    )
    np.testing.assert_allclose(turned, feat, atol=1e-2)


# ---------------------------------------------------------------------------------------------- registration
@pytest.mark.skipif(not BUNNY.is_file(), reason="Stanford bunny scan not available")
def test_register_recovers_known_pose_of_real_scan():
    o3d = pytest.importorskip("open3d")
    scan = np.asarray(o3d.io.read_point_cloud(str(BUNNY)).points)
    voxel = float(np.linalg.norm(scan.max(0) - scan.min(0))) / 50
    dense = scan[voxel_downsample(scan, voxel / 3)]
    rot = rotation(np.array([1.0, 2.0, -0.5]), 55.0)
    shift = np.array([0.05, -0.02, 0.1])
    source = dense[0::2]  # two different samplings of the surface, as two real scans would be
    target = dense[1::2] @ rot.T + shift
    transform, fitness = register(source, target, voxel, seed=0)
    angle = np.degrees(np.arccos(np.clip((np.trace(transform[:3, :3].T @ rot) - 1) / 2, -1, 1)))
    assert angle < 1.0
    assert np.linalg.norm(transform[:3, 3] - shift) < 0.2 * voxel
    assert fitness > 0.9


# ------------------------------------------------------------------------------------------------------ BTF
def test_btf_patch_shapes_and_similarity_invariance(rng):
    pts = sphere(rng, 3000) * np.array([1.0, 0.7, 0.5])
    centers, group_idx, feats = btf_patch_features(pts, num_groups=64, group_size=32, scale=0.7, seed=1)
    assert centers.shape == (64, 3) and group_idx.shape == (64, 32) and feats.shape == (64, 33)
    assert group_idx.min() >= 0 and group_idx.max() < 3000
    # every group is the 32 nearest points of its centre
    nearest = np.argsort(np.linalg.norm(pts - centers[5], axis=1))[:32]
    assert set(group_idx[5].tolist()) == set(nearest.tolist())
    # radii live in class-scale units: the same part 4x larger with a 4x scale gives the same features
    big = btf_patch_features(pts * 4.0, num_groups=64, group_size=32, scale=2.8, seed=1)
    assert np.array_equal(big.group_idx, group_idx) and np.array_equal(big.features, feats)


def test_btf_features_flag_a_dent_through_the_bank(rng):
    """End to end: FPFH patches of a dented sphere are far from a bank of clean spheres at the dent only."""
    # 6000 points on a unit sphere are ~0.05 apart, so a 0.06 voxel gives normals ~20 neighbours (see
    # tools/btf.py)
    kwargs = {"num_groups": 64, "group_size": 48, "scale": 1.0, "voxel": 0.06}
    train = [sphere(np.random.default_rng(s), 6000) for s in range(3)]
    bank = MemoryBank()
    bank.fit(
        np.vstack([btf_patch_features(t, seed=s, **kwargs).features for s, t in enumerate(train)]),
        coreset_ratio=0.5,
    )
    test = sphere(rng, 6000)
    test[test[:, 2] > 0.9] *= 0.85  # sink the polar cap: a dent with a step at its rim
    patches = btf_patch_features(test, seed=9, **kwargs)
    dist, _ = bank.score(patches.features)
    near_dent = np.linalg.norm(patches.centers - np.array([0, 0, 0.85]), axis=1) < 0.6
    assert near_dent[int(np.argmax(dist))]
    assert dist[near_dent].max() > 5 * np.median(dist[~near_dent])


def test_btf_rejects_bad_scale(rng):
    with pytest.raises(ValueError, match="scale"):
        btf_point_features(sphere(rng, 100), scale=0.0)
