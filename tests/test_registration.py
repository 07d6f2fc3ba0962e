"""Registration to the class template and the coordinate bank (DetectorConfig(register=True))."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from detector.config import FitError
from detector.fitted import FittedClass
from detector.fitting import fit_class
from detector.registration import Alignment, CoordinateBank
from tests.tiny import TINY_FIT, part_scans


def turned(points: np.ndarray, degrees: float, axis=(0.3, 1.0, 0.2), shift=(0.5, -0.2, 0.1)) -> np.ndarray:
    """The scan rotated about its centroid and shifted: a part put down on the fixture another way."""
    from scipy.spatial.transform import Rotation

    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    rot = Rotation.from_rotvec(np.radians(degrees) * axis).as_matrix()
    centre = points.mean(axis=0)
    return ((points - centre) @ rot.T + centre + np.asarray(shift)).astype(np.float32)


def test_alignment_apply_and_undo_are_inverse(rng):
    from scipy.spatial.transform import Rotation

    transform = np.eye(4)
    transform[:3, :3] = Rotation.from_rotvec([0.2, -0.4, 0.9]).as_matrix()
    transform[:3, 3] = [1.0, -2.0, 0.5]
    pts = rng.normal(size=(50, 3)).astype(np.float32)
    alignment = Alignment(transform, 0.9)
    np.testing.assert_allclose(alignment.undo(alignment.apply(pts)), pts, atol=1e-5)
    np.testing.assert_allclose(alignment.apply(pts), pts @ transform[:3, :3].T + transform[:3, 3], atol=1e-5)
    assert not alignment.doubtful and Alignment(transform, 0.2).doubtful


def test_coordinate_bank_scores_patches_off_the_normal_surface(rng):
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 40)), -1).reshape(-1, 2)

    def plane(z):
        return np.column_stack([grid, np.full(len(grid), z)]).astype(np.float32)

    bank = CoordinateBank(np.concatenate([plane(0.0), plane(0.001)]), np.repeat([0, 1], len(grid)))
    scan = plane(0.0005)
    scan[:16, 2] += 0.2  # a bulge: these points left the surface
    members = np.array([np.arange(16), np.arange(100, 116)])
    bulge, flat = bank.patch_scores(scan, members)
    assert bulge == pytest.approx(0.2, abs=0.01) and flat < 0.001
    # leave-one-template-out: template 0's points are measured against template 1's only (0.001 away), not
    # itself
    loo = bank.leave_one_out_patch_scores([plane(0.0), plane(0.001)], [members, members])
    np.testing.assert_allclose(loo[0], 0.001, atol=1e-6)
    np.testing.assert_allclose(loo[1], 0.001, atol=1e-6)
    with pytest.raises(ValueError, match="coordinate bank"):
        CoordinateBank(np.zeros((5, 3)), np.zeros(4))


def turned_templates() -> list[np.ndarray]:
    scans = part_scans(3, 2500, seed=0)
    return [scans[0], turned(scans[1], 35.0), turned(scans[2], -50.0, axis=(1.0, 0.0, 0.4))]


@pytest.fixture(scope="module")
def registered_fit() -> FittedClass:
    return fit_class(turned_templates(), dataclasses.replace(TINY_FIT, register=True))


def test_registered_fit_aligns_templates_and_saves_its_banks(registered_fit, tmp_path):
    info = registered_fit.info
    assert len(info["registration_fitness"]) == 2 and min(info["registration_fitness"]) > 0.8  # scans 2 and 3
    assert info["coord_bank_size"] > 0 and set(registered_fit.score_norms) == {"feature", "coord"}
    # the reference is the first template at the coordinate bank's voxel (what the templates were aligned
    # onto)
    from detector.registration import COORD_VOXEL_SHARE
    from scans.geometry import voxel_downsample

    first = turned_templates()[0]
    np.testing.assert_array_equal(
        registered_fit.reference, first[voxel_downsample(first, COORD_VOXEL_SHARE * registered_fit.scale)]
    )
    scan = turned(part_scans(1, 3000, seed=50)[0], 70.0, axis=(0.0, 0.3, 1.0))
    analysis = registered_fit.analyse(scan)
    assert analysis.registered is not None and analysis.alignment.fitness > 0.8
    # a normal scan in a new pose, once registered, lies on the templates: its patches score in the normal
    # range
    full = registered_fit.score(analysis)
    assert np.median(full.patch_scores) < registered_fit.thresholds["patch_p99"]
    # the subset contract holds with two banks: a patch subset scores exactly as in the full scoring
    some = np.arange(0, analysis.n_patches, 5)
    part = registered_fit.score(analysis, patch_ids=some)
    np.testing.assert_array_equal(part.patch_scores, full.patch_scores[some])
    # patch centres are reported in the input's frame (the verbalizer and renders read them)
    nearest = np.min(
        np.linalg.norm(scan[None, :, :] - analysis.patches.centers[:20, None, :], axis=2), axis=1
    )
    assert nearest.max() < 1e-3
    saved = registered_fit.save(tmp_path / "fit")
    again = FittedClass.load(saved)
    np.testing.assert_array_equal(again.score(again.analyse(scan)).patch_scores, full.patch_scores)
    (saved / "coord_points.npy").unlink()
    with pytest.raises(FitError, match="coord_points.npy: missing"):
        FittedClass.load(saved)


def test_a_saved_fit_stores_its_registration_levels_and_loading_reuses_them(registered_fit, tmp_path):
    """Loading takes the template's ICP levels and normals from the folder instead of recomputing them
    (part of a cold run); they equal what the fit computed, a fit without them still loads (and computes
    them), and levels of the wrong shape, even sealed again, are refused with the folder named."""
    import shutil

    from detector.manifest import write_manifest

    saved = registered_fit.save(tmp_path / "fit")
    again = FittedClass.load(saved)
    assert again._registration is not None  # taken from the folder, not built on the first scan
    made, stored = registered_fit.registration_target(), again.registration_target()
    for name in ("coarse", "coarse_normals", "fine", "fine_normals"):
        np.testing.assert_array_equal(getattr(stored, name), getattr(made, name))
    assert stored.spacing == made.spacing
    older = tmp_path / "older"
    shutil.copytree(saved, older)
    shutil.rmtree(older / "registration")
    write_manifest(older)
    assert FittedClass.load(older)._registration is None
    np.save(saved / "registration" / "fine_normals.npy", np.zeros((4, 3)), allow_pickle=False)
    write_manifest(saved)
    with pytest.raises(FitError, match="registration.*fine.*refit"):
        FittedClass.load(saved)


def test_registration_finds_a_bulge_on_a_turned_scan_that_the_unaligned_bank_misses(registered_fit):
    """Templates and test scan in different poses: the registered fit ranks the bulge's points high, the same
    fit
    without registration (its bank knows each template in its own pose only) does not."""
    from sklearn.metrics import roc_auc_score

    from scans.defects import make_defect
    from scans.parts import part_mesh, sample_surface

    clean, normals = sample_surface(part_mesh("bracket"), 3000, seed=77)
    bulged, mask, _, _ = make_defect(clean, normals, "bulge", 5, scale=None, return_normals=True)
    scan = turned(bulged.astype(np.float32), 60.0)
    registered = roc_auc_score(mask, registered_fit.score_full(scan)[0])
    # the verbalizer's cheap cue: distance to the one reference template after alignment (not a bank search)
    cue = registered_fit.analyse(scan).point_stats["template_distance"]
    assert roc_auc_score(mask, cue) > 0.8
    unaligned_fit = fit_class(turned_templates(), TINY_FIT)
    unaligned = roc_auc_score(mask, unaligned_fit.score_full(scan)[0])
    assert registered > 0.85 and registered > unaligned + 0.2


def test_policy_inspection_of_a_turned_scan_reports_the_alignment(registered_fit):
    """agent.run on a registered fit: report.json says how the scan was aligned, and the agent's cue table
    carries
    the template distance."""
    from agent.backends import get_backend
    from agent.pipeline import inspect_scan

    scan = turned(part_scans(1, 3000, seed=51)[0], 40.0)
    inspection = inspect_scan(scan, registered_fit, get_backend("policy"))
    report = inspection.report()
    assert report["registration"]["fitness"] > 0.8 and not report["registration"]["doubtful"]
    transform = np.array(report["registration"]["transform"])
    assert transform.shape == (4, 4) and np.allclose(
        transform[:3, :3] @ transform[:3, :3].T, np.eye(3), atol=1e-5
    )
    assert "template_distance_mean" in inspection.table.columns
    assert 0 < report["verified_fraction"] <= 0.2


def test_scans_that_do_not_align_are_refused_or_flagged(registered_fit, tmp_path):
    """A training scan of another shape is refused naming it; at test time a fragment is flagged doubtful, and
    a scan
    too small to register exits 2 from agent.run with the file named and nothing written."""
    from agent.run import main as run_main
    from scans.io import write_pcd

    scans = part_scans(2, 2500, seed=0)
    line = np.column_stack([np.linspace(0, 80, 2500), np.zeros(2500), np.zeros(2500)]).astype(np.float32)
    with pytest.raises(FitError, match="training scan 2: .*(doubtful|cannot be registered)"):
        fit_class([*scans, line], dataclasses.replace(TINY_FIT, register=True))
    scan = part_scans(1, 3000, seed=52)[0]
    corner = scan[np.argsort(scan[:, 0])[:300]]  # a tenth of the part
    assert registered_fit.analyse(corner).alignment.doubtful
    fit_dir = registered_fit.save(tmp_path / "fit")
    tiny = tmp_path / "tiny.pcd"
    # the part's size (passes the class-size check) but only two clumps of points: nothing to register
    clumps = np.random.default_rng(0).normal(scale=1e-3 * registered_fit.scale, size=(80, 3))
    clumps[:40, 0] += registered_fit.scale
    clumps[40:, 0] -= registered_fit.scale
    write_pcd(tiny, clumps.astype(np.float32))
    out = tmp_path / "runs"
    assert run_main([str(tiny), "--bank", str(fit_dir), "--out", str(out), "--no-render"]) == 2
    assert not (out / "tiny").exists()
