"""Defect synthesis: shares like the public benchmarks, determinism, and labels where the defect is."""

import numpy as np
import pytest
import trimesh

from scans.defects import DEFECT_TYPES, make_defect
from scans.parts import extent, part_mesh, sample_surface

N_POINTS = 8000


@pytest.fixture(scope="module")
def sphere_cloud() -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere: its exact normals are the points themselves, so inward/outward is checkable."""
    points, _ = sample_surface(trimesh.creation.icosphere(subdivisions=4), N_POINTS, seed=1)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points, points.copy()


@pytest.fixture(scope="module")
def flange_cloud() -> tuple[np.ndarray, np.ndarray]:
    return sample_surface(part_mesh("flange"), N_POINTS, seed=2)


@pytest.mark.parametrize("kind", DEFECT_TYPES)
@pytest.mark.parametrize("shape", ["sphere_cloud", "flange_cloud"])
def test_share_is_like_the_public_benchmarks(kind: str, shape: str, request) -> None:
    points, normals = request.getfixturevalue(shape)
    for seed in (0, 1):
        new_points, mask, info = make_defect(points, normals, kind, seed=seed)
        assert new_points.shape == (len(mask), 3)
        assert 0.01 <= mask.mean() <= 0.08, (kind, shape, seed, mask.mean())
        assert info["type"] == kind and info["share"] == pytest.approx(mask.mean())
        assert np.isfinite(new_points).all()


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_deterministic_by_seed(kind: str, flange_cloud) -> None:
    points, normals = flange_cloud
    a_points, a_mask, a_info = make_defect(points, normals, kind, seed=7)
    b_points, b_mask, b_info = make_defect(points, normals, kind, seed=7)
    _c_points, c_mask, _ = make_defect(points, normals, kind, seed=8)
    assert np.array_equal(a_points, b_points) and np.array_equal(a_mask, b_mask) and a_info == b_info
    assert len(a_mask) != len(c_mask) or not np.array_equal(a_mask, c_mask)


@pytest.mark.parametrize("kind", ["bulge", "concavity", "crack", "hole", "scratch"])
def test_labels_cluster_around_the_centre(kind: str, flange_cloud) -> None:
    points, normals = flange_cloud
    new_points, mask, info = make_defect(points, normals, kind, seed=3)
    centre = np.asarray(info["centre"])
    labelled = np.linalg.norm(new_points[mask] - centre, axis=1)
    everything = np.linalg.norm(new_points - centre, axis=1)
    # a localised defect: its points are far closer to the centre than the object's points are on average
    if kind in (
        "bulge",
        "concavity",
    ):  # size = geodesic radius of the bump, never shorter than the straight line
        assert labelled.max() <= 1.01 * info["size"]
    elif kind in ("crack", "scratch"):  # centre = arc-length midpoint of a curve of length size
        assert labelled.max() <= 0.5 * info["size"] + 0.5 * info["width"] + 1e-9
        return  # long thin defects are not compact, so the median test below does not apply
    elif (
        kind == "hole"
    ):  # size = geodesic radius of the removed patch; the ring (at most 5 % of the points around
        # at least 2 % removed) ends within sqrt(1 + 5/2) < 1.9 radii on a flat surface
        assert labelled.max() <= 1.9 * info["size"]
        assert np.median(labelled) >= 0.9 * info["size"]  # a ring around the hole, not a patch inside it
        return
    assert np.median(labelled) < 0.35 * np.median(everything)


def test_broken_labels_the_cut(flange_cloud) -> None:
    points, normals = flange_cloud
    new_points, mask, info = make_defect(points, normals, "broken", seed=4)
    offsets = (new_points - np.asarray(info["centre"])) @ np.asarray(info["plane_normal"])
    assert offsets.max() <= 1e-9  # everything beyond the plane is gone
    assert np.abs(offsets[mask]).max() < 0.05 * extent(points)  # labels sit on / along the cut
    assert info["cut_face_points"] > 0 and info["removed_points"] > 0


def test_directions_on_the_sphere(sphere_cloud) -> None:
    points, normals = sphere_cloud

    def radius(p):
        return np.linalg.norm(p, axis=1)

    bulged, mask, _ = make_defect(points, normals, "bulge", seed=5)
    assert radius(bulged[mask]).min() > 1.0
    for kind in ("concavity", "crack", "scratch"):
        dented, mask, _ = make_defect(points, normals, kind, seed=5)
        assert radius(dented[mask]).max() < 1.0, kind
    broken, mask, info = make_defect(points, normals, "broken", seed=5)
    face = broken[-info["cut_face_points"] :]
    assert mask[-info["cut_face_points"] :].all()
    # the new face fills the inside of the cut, not the outside (up to the chord sag of the sampled rim: the
    # point
    # spacing is ~0.04 on this sphere, so the sag is < 0.001)
    assert radius(face).max() < 1.002
    holed, mask, info = make_defect(points, normals, "hole", seed=5)
    assert len(holed) == len(points) - info["removed_points"]


def test_normals_are_estimated_when_missing(sphere_cloud) -> None:
    points, _ = sphere_cloud
    bulged, mask, _ = make_defect(points, None, "bulge", seed=6)
    assert 0.01 <= mask.mean() <= 0.08
    assert np.linalg.norm(bulged[mask], axis=1).min() > 1.0  # estimated normals were oriented outward


@pytest.mark.parametrize("kind", ["bulge", "concavity", "crack", "scratch", "hole"])
def test_severity_makes_the_same_defect_subtler(kind: str, sphere_cloud) -> None:
    """severity 0.5: the same place (same random draws), about half the labelled share, and for the dents and
    grooves about half the depth."""
    points, normals = sphere_cloud
    full_points, full_mask, full = make_defect(points, normals, kind, seed=4)
    half_points, half_mask, half = make_defect(points, normals, kind, seed=4, severity=0.5)
    where = "start" if kind in ("crack", "scratch") else "centre"  # a groove is also shorter: same start
    assert half[where] == full[where]
    assert 0.35 <= half_mask.mean() / full_mask.mean() <= 0.65, (kind, half_mask.mean(), full_mask.mean())
    if kind != "hole":  # a hole removes points: depth is not defined
        full_depth = np.abs(np.linalg.norm(full_points, axis=1) - 1.0).max()
        half_depth = np.abs(np.linalg.norm(half_points, axis=1) - 1.0).max()
        assert 0.3 <= half_depth / full_depth <= 0.7, (kind, half_depth, full_depth)
    for bad in (0.0, -1.0, float("nan"), 5.0):
        with pytest.raises(ValueError, match="severity"):
            make_defect(points, normals, kind, seed=4, severity=bad)


def test_bad_input_is_refused(sphere_cloud) -> None:
    points, normals = sphere_cloud
    with pytest.raises(ValueError, match="unknown defect kind"):
        make_defect(points, normals, "rust", seed=0)
    with pytest.raises(ValueError, match="N>=200"):
        make_defect(points[:10], normals[:10], "bulge", seed=0)
