"""Surface cues (detector.surface_cues): what they see, that the fit keeps them, how they join the bank."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial import cKDTree

from detector.config import FitError
from detector.fitted import FittedClass
from detector.manifest import MANIFEST_FILE
from detector.surface_cues import SurfaceCues
from scans.parts import part_mesh, sample_surface, scan_like
from verbalize import describe_scan
from verbalize.render import render_overview


def aligned_samples(count: int, points: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Noisy samples of the bracket in one pose (what registered scans are), with their normals."""
    mesh = part_mesh("bracket")
    out = []
    for i in range(count):
        clean, normals = sample_surface(mesh, points, seed=seed + i)
        noisy, _ = scan_like(clean, normals, seed=seed + 100 + i, max_rotation_deg=0.0, max_shift=0.0)
        out.append((noisy.astype(np.float32), normals.astype(np.float32)))
    return out


@pytest.fixture(scope="module")
def cues() -> SurfaceCues:
    return SurfaceCues.fit([points for points, _ in aligned_samples(3, 4000, seed=0)])[0]


@pytest.fixture(scope="module")
def test_sample() -> tuple[np.ndarray, np.ndarray]:
    return aligned_samples(1, 4000, seed=40)[0]


def _spacing(points: np.ndarray) -> float:
    return float(np.median(cKDTree(points).query(points, k=2)[0][:, 1]))


def test_surface_distance_sees_a_dent_shallower_than_the_point_spacing(cues, test_sample):
    points, normals = test_sample
    spacing = _spacing(points)
    centre = points[123]
    dent = np.linalg.norm(points - centre, axis=1) < 6 * spacing
    moved = points.copy()
    moved[dent] -= 0.8 * spacing * normals[dent]  # pushed in by less than one sampling step
    surface = cues.per_point(moved)["surface_distance"]
    assert np.median(surface[dent]) > 1.0  # beyond the class's normal limit
    assert np.median(surface[dent]) > np.percentile(surface[~dent], 99)
    # the distance to the nearest template point (what the coordinate bank averages) does not see it
    nearest = cKDTree(cues.points).query(moved, k=1)[0]
    assert np.median(nearest[dent]) < np.percentile(nearest[~dent], 99)


def test_uncovered_rim_marks_the_points_around_a_hole_and_not_the_rest(cues, test_sample):
    points, _ = test_sample
    spacing = _spacing(points)
    distance = np.linalg.norm(points - points[321], axis=1)
    holed = points[distance > 5 * spacing]
    rim = cues.per_point(holed)["uncovered_rim"]
    near = distance[distance > 5 * spacing] < 9 * spacing
    assert np.median(rim[near]) > 1.0
    assert np.mean(rim[~near] > 1.0) < 0.01


def test_cues_are_saved_with_the_fit_listed_in_its_manifest_and_refused_when_edited(fitted, scan, tmp_path):
    assert fitted.cues is not None  # the tiny fit is unregistered: the cues use the input pose
    fitted.save(tmp_path / "fit")
    listed = json.loads((tmp_path / "fit" / MANIFEST_FILE).read_text())["sha256"]
    assert {"cues/cue_points.npy", "cues/cue_normals.npy", "cues/cues.json"} <= set(listed)
    loaded = FittedClass.load(tmp_path / "fit")
    before, after = fitted.score(fitted.analyse(scan)), loaded.score(loaded.analyse(scan))
    assert np.array_equal(before.point_scores, after.point_scores)
    normals = tmp_path / "fit" / "cues" / "cue_normals.npy"
    values = np.load(normals)
    values[0] = -values[0]
    np.save(normals, values)
    with pytest.raises(FitError, match="cue_normals.npy"):
        FittedClass.load(tmp_path / "fit")


def test_point_scores_add_the_cues_and_a_subset_scores_as_the_full_scan(fitted, analysis):
    assert {"surface_distance", "uncovered_rim"} <= analysis.point_stats.keys()
    full = fitted.score(analysis)
    bank_only = FittedClass.score(fitted, _without_cues(analysis))
    assert np.allclose(full.point_scores - bank_only.point_scores, analysis.cue_total[full.point_ids])
    ids = np.arange(0, len(analysis.points), 5)
    part = fitted.score(analysis, ids)
    assert np.array_equal(part.point_scores, full.point_scores[np.isin(full.point_ids, part.point_ids)])
    assert full.object_score >= float(full.point_scores.max())


def _without_cues(analysis):
    from dataclasses import replace

    return replace(analysis, cue_total=None)


def test_the_overview_shows_the_surface_cues_in_normal_units(analysis):
    patches, table = describe_scan(analysis.points, point_stats=analysis.point_stats)
    text = render_overview(table)
    assert "surface_distance_max" in text and "uncovered_rim_max" in text
    assert "1 = the most a normal scan shows" in text


def test_the_side_is_outward_all_over_the_part_even_where_the_surface_faces_its_centre(cues, test_sample):
    """The bracket's inner corner faces its centroid: normals flipped away from the centroid called material
    added there "removed" (65% of the signs right); the propagated ones (scans.orientation) are right."""
    points, normals = test_sample
    step = 0.8 * _spacing(points)
    assert np.mean(cues.side(points + step * normals) > 0) > 0.97
    assert np.mean(cues.side(points - step * normals) < 0) > 0.97


def test_oriented_normals_agree_with_the_mesh_and_with_a_reference_template():
    from scans.orientation import oriented_normals
    from scans.training_parts import training_mesh

    mesh = training_mesh("spacer_ring")  # a bore: a quarter of its surface faces the centroid
    first, first_normals = sample_surface(mesh, 3000, seed=1)
    second, second_normals = sample_surface(mesh, 3000, seed=2)
    own = oriented_normals(first)
    assert np.mean(np.einsum("ij,ij->i", own, first_normals) > 0) > 0.99
    # a reference with every sign turned over turns this one over too: one convention per fit
    flipped = oriented_normals(second, reference=(first, -own))
    assert np.mean(np.einsum("ij,ij->i", flipped, second_normals) < 0) > 0.99


def test_a_fit_saved_before_the_normals_were_oriented_is_oriented_when_loaded(cues, tmp_path):
    """An older fit's cues.json has no "normals" entry and its normals point away from the centroid: loading
    it re-orients them as a fit does now, so its sides are right without refitting."""
    from scans.geometry import estimate_normals

    cues.save(tmp_path)
    meta = json.loads((tmp_path / "cues.json").read_text())
    del meta["normals"]
    (tmp_path / "cues.json").write_text(json.dumps(meta))
    old = np.concatenate([estimate_normals(cues.points[cues.source == i]) for i in np.unique(cues.source)])
    np.save(tmp_path / "cue_normals.npy", old)
    assert np.mean(np.einsum("ij,ij->i", old, cues.normals) > 0) < 0.9  # the old signs were wrong in places
    loaded = SurfaceCues.load(tmp_path)
    assert np.array_equal(loaded.normals, cues.normals)
    assert np.array_equal(np.load(tmp_path / "cue_normals.npy"), old)  # the files are left as they were
