"""Faults in the data path (issue 10 items 4, 5, 8, 10): a damaged fitted folder, strict JSON, one output row
per input row, isolated far outliers, and huge scans analysed on a bounded sample.

Most tests call `agent.run.main([...])` in-process with a tiny fitted class made once for the module.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import agent.run as run_cli
from agent.report import write_outputs
from agent.sampled import analysis_rows
from detector.fitted import FittedClass
from detector.fitting import fit_class
from detector.manifest import MANIFEST_FILE
from scans import strict_json
from scans.io import read_scan
from scans.outliers import find_far_outliers
from tests.tiny import TINY_FIT, part_scans


@pytest.fixture(scope="module")
def fit() -> FittedClass:
    return fit_class(part_scans(3, 2500, seed=0), TINY_FIT)


@pytest.fixture(scope="module")
def bank(fit, tmp_path_factory) -> Path:
    return fit.save(tmp_path_factory.mktemp("fit") / "bracket")


@pytest.fixture(scope="module")
def points() -> np.ndarray:
    return part_scans(1, 2000, seed=50)[0]


def run(*argv: object) -> int:
    return run_cli.main([str(a) for a in argv])


def strict_load(path: Path) -> dict:
    """json.loads that refuses NaN/Infinity, as every reader other than Python's does."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def damaged_copy(bank: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(bank, copy)
    return copy


# ---------------------------------------------------------------------------- item 4: the fitted folder
def test_a_flipped_bit_in_the_bank_exits_2_naming_the_file(bank, points, tmp_path, capsys):
    damaged = damaged_copy(bank, tmp_path)
    raw = bytearray((damaged / "bank" / "bank.npy").read_bytes())
    raw[-5] ^= 0x01  # one bit of one feature value: still a valid float32 array of the right shape
    (damaged / "bank" / "bank.npy").write_bytes(bytes(raw))
    np.save(tmp_path / "scan.npy", points)
    assert run(tmp_path / "scan.npy", "--bank", damaged, "--out", tmp_path / "out", "--no-render") == 2
    printed = capsys.readouterr().out
    assert str(damaged / "bank" / "bank.npy") in printed and "refit" in printed
    assert not (tmp_path / "out").exists()


def test_nan_in_mean_feature_exits_2_naming_the_file(bank, points, tmp_path, capsys):
    damaged = damaged_copy(bank, tmp_path)
    mean = np.load(damaged / "mean_feature.npy")
    mean[0] = np.nan
    np.save(damaged / "mean_feature.npy", mean)
    np.save(tmp_path / "scan.npy", points)
    assert run(tmp_path / "scan.npy", "--bank", damaged, "--out", tmp_path / "out", "--no-render") == 2
    assert "mean_feature.npy" in capsys.readouterr().out


def test_nan_threshold_exits_2_and_writes_no_report(bank, points, tmp_path, capsys):
    damaged = damaged_copy(bank, tmp_path)
    meta = json.loads((damaged / "fitted.json").read_text())
    meta["thresholds"]["patch_p99"] = float("nan")
    (damaged / "fitted.json").write_text(json.dumps(meta))  # Python writes a bare NaN here
    np.save(tmp_path / "scan.npy", points)
    assert run(tmp_path / "scan.npy", "--bank", damaged, "--out", tmp_path / "out", "--no-render") == 2
    assert "fitted.json" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_a_graph_of_another_backbone_resealed_exits_2_naming_the_file(bank, points, tmp_path, capsys):
    """The exported Point-MAE pass is checked against the bank's backbone, not only against the manifest."""
    from detector.manifest import write_manifest
    from detector.pointmae_runtime import GRAPH_META

    damaged = damaged_copy(bank, tmp_path)
    record = json.loads((damaged / "backbone" / GRAPH_META).read_text())
    (damaged / "backbone" / GRAPH_META).write_text(json.dumps({**record, "backbone_hash": "0" * 64}))
    write_manifest(damaged)
    np.save(tmp_path / "scan.npy", points)
    assert run(tmp_path / "scan.npy", "--bank", damaged, "--out", tmp_path / "out", "--no-render") == 2
    printed = capsys.readouterr().out
    assert "scan_pass.onnx" in printed and "refit" in printed
    assert not (tmp_path / "out").exists()


def test_a_fit_saved_before_the_graph_runs_and_scores_the_same(bank, points, tmp_path):
    """An older fitted folder (weights only) is exported on reading, with the same scores as the graph."""
    from detector.manifest import write_manifest
    from detector.pointmae_runtime import GRAPH_FILE, GRAPH_META

    older = damaged_copy(bank, tmp_path)
    for name in (GRAPH_FILE, GRAPH_META):
        (older / "backbone" / name).unlink()
    write_manifest(older)
    np.save(tmp_path / "scan.npy", points)
    for folder, out in ((bank, "now"), (older, "before")):
        assert run(tmp_path / "scan.npy", "--bank", folder, "--out", tmp_path / out, "--no-render") == 0
    now, before = (json.loads((tmp_path / o / "scan" / "report.json").read_text()) for o in ("now", "before"))
    assert now["object_score"] == before["object_score"]
    assert sorted(p.name for p in (older / "backbone").iterdir()) == ["config.json", "model.safetensors"]


def test_a_fit_without_its_manifest_is_refused_with_a_refit_message(bank, points, tmp_path, capsys):
    damaged = damaged_copy(bank, tmp_path)
    (damaged / MANIFEST_FILE).unlink()
    np.save(tmp_path / "scan.npy", points)
    assert run(tmp_path / "scan.npy", "--bank", damaged, "--out", tmp_path / "out", "--no-render") == 2
    printed = capsys.readouterr().out
    assert MANIFEST_FILE in printed and "refit" in printed


def test_saving_a_fit_with_a_nan_threshold_is_refused_naming_the_key(fit, tmp_path):
    thresholds = {**fit.thresholds, "patch_p99": math.nan}
    broken = FittedClass(
        fit.config,
        fit.scale,
        fit.bank,
        fit.mean_feature,
        thresholds,
        fit.backbone,
        score_norms=fit.score_norms,
        cues=fit.cues,
    )
    with pytest.raises(ValueError, match=r"fitted\.json: thresholds\.patch_p99 is not a finite number"):
        broken.save(tmp_path / "cls")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_report_json_writes_a_missing_number_as_null(fit, points, tmp_path):
    from agent.backends import get_backend
    from agent.pipeline import inspect_scan

    inspection = inspect_scan(points, fit, get_backend("policy"))
    inspection.seconds["analyse"] = math.nan  # a value that could not be measured
    write_outputs(inspection, tmp_path / "out", source="scan.npy", render=False)
    report = strict_load(tmp_path / "out" / "report.json")
    assert report["seconds"]["analyse"] is None and report["object_score"] == inspection.object_score


def test_strict_json_refuses_nan_naming_the_document_and_key():
    with pytest.raises(ValueError, match=r"meta\.json: a\.b\[1\] is not a finite number"):
        strict_json.dumps({"a": {"b": [1.0, np.float32("inf")]}}, what="meta.json")


def test_strict_json_is_the_one_converter_for_numpy_values_and_paths():
    document = {"path": Path("runs") / "a.ply", "n": np.int64(3), "x": np.float32(0.5), "v": np.arange(2)}
    assert json.loads(strict_json.dumps(document, missing_as_null=True)) == {
        "path": str(Path("runs") / "a.ply"),
        "n": 3,
        "x": 0.5,
        "v": [0, 1],
    }
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        strict_json.dumps({"o": object()})


# ---------------------------------------------------------------------------- item 5: one row per input row
def test_scores_have_one_value_per_input_row_with_nan_where_a_row_was_dropped(bank, points, tmp_path):
    rows = points.astype(np.float64)
    bad = [0, 777, len(rows) - 1]
    rows[bad[0], 0], rows[bad[1], 2], rows[bad[2], 1] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "holes.npy", rows)
    with pytest.warns(UserWarning, match="dropped 3 of"):
        assert run(tmp_path / "holes.npy", "--bank", bank, "--out", tmp_path / "out", "--no-render") == 0
    scores = np.load(tmp_path / "out" / "holes" / "scores.npy")
    assert scores.shape == (len(rows),)
    assert np.flatnonzero(np.isnan(scores)).tolist() == bad
    report = strict_load(tmp_path / "out" / "holes" / "report.json")
    assert report["dropped_nonfinite"] == 3 and report["n_input_rows"] == len(rows)
    assert report["n_points"] == len(rows) - 3


# ---------------------------------------------------------------------------- item 8: far outliers
def test_one_stray_far_point_is_dropped_with_a_count_not_the_scan_rejected(bank, points, tmp_path):
    rows = points.astype(np.float64)
    rows[10] = [1e6, 0.0, 0.0]
    np.save(tmp_path / "stray.npy", rows)
    with pytest.warns(UserWarning, match="dropped 1 isolated point"):
        assert run(tmp_path / "stray.npy", "--bank", bank, "--out", tmp_path / "out", "--no-render") == 0
    report = strict_load(tmp_path / "out" / "stray" / "report.json")
    assert report["dropped_outliers"] == 1 and report["dropped_nonfinite"] == 0
    scores = np.load(tmp_path / "out" / "stray" / "scores.npy")
    assert len(scores) == len(rows) and np.flatnonzero(np.isnan(scores)).tolist() == [10]


def test_a_far_point_does_not_decide_the_zero_shot_score(points, tmp_path):
    np.save(tmp_path / "clean.npy", points)
    stray = np.concatenate([points, [[3e37, 0.0, 0.0]]]).astype(np.float32)
    np.save(tmp_path / "stray.npy", stray)
    with pytest.warns(UserWarning, match="isolated"):
        assert (
            run(tmp_path / "clean.npy", tmp_path / "stray.npy", "--out", tmp_path / "out", "--no-render") == 0
        )
    clean = strict_load(tmp_path / "out" / "clean" / "report.json")
    with_stray = strict_load(tmp_path / "out" / "stray" / "report.json")
    assert with_stray["dropped_outliers"] == 1
    assert with_stray["object_score"] == clean["object_score"]
    assert [r["verdict"] for r in with_stray["regions"]] == [r["verdict"] for r in clean["regions"]]


def test_only_isolated_far_points_count_as_outliers():
    rng = np.random.default_rng(0)
    shaft = np.column_stack([rng.uniform(0, 200, 5000), rng.normal(0, 5, 5000), rng.normal(0, 5, 5000)])
    assert find_far_outliers(shaft).size == 0  # an elongated part's ends are not outliers
    cluster = np.concatenate([shaft, rng.normal(0, 1, (40, 3)) + [5e4, 0, 0]])
    assert find_far_outliers(cluster).size == 0  # a far group of points is real data, judged downstream
    lone = np.concatenate([shaft, [[5e4, 0, 0]], [[0, -3e3, 0]]])
    assert find_far_outliers(lone).tolist() == [5000, 5001]


def test_read_scan_keeps_the_file_row_of_every_point(points, tmp_path):
    rows = points.astype(np.float64)
    rows[3] = np.nan
    rows[5] = [0.0, 0.0, 1e6]
    np.save(tmp_path / "scan.npy", rows)
    with pytest.warns(UserWarning):
        scan = read_scan(tmp_path / "scan.npy")
    assert scan.dropped_nonfinite == 1 and scan.dropped_outliers == 1 and scan.n_input_rows == len(rows)
    np.testing.assert_array_equal(scan.points, rows[scan.input_rows].astype(np.float32))
    assert 3 not in scan.input_rows and 5 not in scan.input_rows


# ---------------------------------------------------------------------------- item 10: huge scans
def test_a_scan_above_the_analysis_cap_is_sampled_and_every_row_scored_in_order(bank, points, tmp_path):
    from scipy.spatial import cKDTree

    rows = points.astype(np.float64)
    rows[42] = np.nan
    np.save(tmp_path / "big.npy", rows)
    cap = 600
    with pytest.warns(UserWarning):
        assert (
            run(
                tmp_path / "big.npy",
                "--bank",
                bank,
                "--out",
                tmp_path / "out",
                "--no-render",
                "--max-analysis-points",
                cap,
            )
            == 0
        )
    report = strict_load(tmp_path / "out" / "big" / "report.json")
    assert report["analysed_points"] == cap and report["n_points"] == len(rows) - 1
    scores = np.load(tmp_path / "out" / "big" / "scores.npy")
    assert scores.shape == (len(rows),) and np.flatnonzero(np.isnan(scores)).tolist() == [42]

    kept = np.delete(np.arange(len(rows)), 42)  # file rows of the scan's points
    sample = analysis_rows(len(kept), cap, seed=0)  # the rows the run analysed
    np.save(tmp_path / "sample.npy", rows[kept[sample]])  # the same points as a scan of their own
    assert run(tmp_path / "sample.npy", "--bank", bank, "--out", tmp_path / "out", "--no-render") == 0
    alone = np.load(tmp_path / "out" / "sample" / "scores.npy")
    np.testing.assert_array_equal(scores[kept[sample]], alone)  # the analysed points keep their own scores
    _, nearest = cKDTree(rows[kept[sample]]).query(rows[kept], k=1)
    np.testing.assert_array_equal(scores[kept], alone[nearest])  # every other row: its nearest analysed point


def test_a_label_file_per_file_row_follows_the_dropped_rows(points, tmp_path):
    from scans.datasets import GT_LABEL_FILE, Sample

    rows = points.astype(np.float64)
    rows[7] = [1e6, 0.0, 0.0]  # a stray return, dropped on reading
    labels = np.zeros(len(rows), dtype=np.float64)
    labels[100:120] = 1
    np.save(tmp_path / "scan.npy", rows)
    np.save(tmp_path / "scan.labels.npy", labels)
    sample = Sample(
        tmp_path / "scan.npy", "part", "test", 1, "bulge", tmp_path / "scan.labels.npy", GT_LABEL_FILE
    )
    with pytest.warns(UserWarning, match="isolated"):
        loaded = sample.load()
    np.testing.assert_array_equal(loaded.mask, labels[loaded.scan.input_rows] > 0)
