"""Dataset loaders and ``python -m evals.datasets`` on fixture trees written in the real layouts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scans.dataset_summary import main, summarize_class
from scans.datasets import (
    LAYOUTS,
    DatasetError,
    GroundTruthError,
    Sample,
    align_gt_rows,
    defect_type_from_name,
    open_dataset,
)
from scans.io import ScanError
from scans.preprocess import remove_background_plane
from tests.fixture_trees import (
    MVTEC_OBJECT,
    Expected,
    Manifest,
    mvtec_scene,
    sphere_cloud,
    write_anomaly_shapenet,
    write_folder,
    write_mvtec3d,
    write_real3d_ad,
)

REPO = Path(__file__).resolve().parents[1]


def _assert_matches(dataset, manifest: Manifest) -> None:
    """Listing and loading agree with what the fixture wrote: names, order, labels, defect types, masks."""
    assert dataset.classes() == sorted(manifest)
    for cls, expected in manifest.items():
        for split in ("train", "validation", "test"):
            samples = getattr(dataset, split)(cls)
            wanted = [e for e in expected if e.split == split]
            assert sorted(s.path.name for s in samples) == sorted(e.name for e in wanted), (cls, split)
            by_key = {(e.name, e.defect_type): e for e in wanted}
            for sample in samples:
                exp: Expected = by_key[(sample.path.name, sample.defect_type)]
                assert (sample.cls, sample.split, sample.label) == (cls, split, exp.label)
                loaded = sample.load()
                assert loaded.points.dtype == np.float32 and loaded.points.shape[1] == 3
                if exp.mask is None:
                    assert loaded.mask is None or not loaded.mask.any()
                else:
                    assert loaded.mask is not None and loaded.mask.dtype == bool
                    np.testing.assert_array_equal(loaded.mask, exp.mask)
                    assert loaded.object_label == int(exp.mask.any())


def test_anomaly_shapenet_tree(tmp_path):
    manifest = write_anomaly_shapenet(tmp_path)
    dataset = open_dataset(f"anomaly-shapenet:{tmp_path}")
    _assert_matches(dataset, manifest)
    test = dataset.test("ashtray0")
    # sorted by file name, stable
    assert [s.path.name for s in test] == sorted(s.path.name for s in test)
    assert {s.defect_type for s in test} == {"good", "bulge", "hole"}
    gt_dir = tmp_path / "pcd" / "ashtray0" / "GT"
    assert all(s.gt_path == gt_dir / f"{s.path.stem}.txt" for s in test if s.label)
    assert dataset.validation("ashtray0") == []
    assert summarize_class(dataset, "ashtray0").problems == []


def test_real3d_tree_with_shuffled_gt_rows(tmp_path):
    manifest = write_real3d_ad(tmp_path)
    dataset = open_dataset(f"real3d-ad:{tmp_path}")
    _assert_matches(dataset, manifest)  # 102_sink_cut has shuffled GT rows; masks still match point order
    assert "0_template.pcd" not in {s.path.name for s in dataset.test("seahorse")}
    assert summarize_class(dataset, "seahorse").problems == []


def test_mvtec_tree_masks_follow_pixels(tmp_path):
    manifest = write_mvtec3d(tmp_path)
    dataset = open_dataset(f"mvtec3d:{tmp_path}")
    _assert_matches(dataset, manifest)
    crack = [s for s in dataset.test("tire") if s.label == 1]
    assert [s.defect_type for s in crack] == ["crack", "crack"]
    loaded = crack[0].load()
    assert loaded.scan.grid_shape == (16, 20)
    assert len(loaded.points) == 16 * 20 - 20 - 2  # invalid first row and two zero pixels dropped
    assert len(dataset.validation("bagel")) == 1
    assert summarize_class(dataset, "bagel").problems == []


def test_mvtec_background_removal_drops_plane_with_mask(tmp_path):
    write_mvtec3d(tmp_path, classes=("bagel",))
    dataset = open_dataset(f"mvtec3d:{tmp_path}", remove_background=True)
    sample = next(s for s in dataset.test("bagel") if s.label == 1)
    loaded = sample.load()
    rows, cols = np.divmod(loaded.scan.grid_index[loaded.kept_rows], 20)
    on_object = np.zeros((16, 20), dtype=bool)
    on_object[MVTEC_OBJECT] = True
    assert on_object[rows, cols].all()  # nothing of the plane is left
    assert len(loaded.points) == on_object.ravel()[loaded.scan.grid_index].sum()  # all object points kept
    full = dataclasses.replace(sample, remove_background=False).load()
    np.testing.assert_array_equal(loaded.mask, full.mask[loaded.kept_rows])
    assert loaded.mask.sum() == full.mask.sum()  # the defect sits on the object


def test_background_removal_is_deterministic_and_unit_free():
    image, on_object = mvtec_scene(seed=3)
    valid = (image != 0).any(axis=-1)
    points = image[valid]
    index = np.flatnonzero(valid.ravel())
    first = remove_background_plane(points, grid_shape=(16, 20), grid_index=index, seed=5)
    again = remove_background_plane(points, grid_shape=(16, 20), grid_index=index, seed=5)
    np.testing.assert_array_equal(first.keep, again.keep)
    np.testing.assert_array_equal(first.keep, on_object[valid])
    scaled = remove_background_plane(points * 1000.0, grid_shape=(16, 20), grid_index=index, seed=5)
    np.testing.assert_array_equal(scaled.keep, first.keep)  # threshold is relative to the extent
    assert abs(abs(first.plane[2]) - 1.0) < 1e-3  # the support is z = const


@pytest.mark.parametrize("with_classes", [False, True])
def test_folder_tree(tmp_path, with_classes):
    root = tmp_path / "myparts"
    manifest = write_folder(root, classes=("left", "right") if with_classes else None)
    dataset = open_dataset(f"folder:{root}")
    _assert_matches(dataset, manifest)
    cls = dataset.classes()[0]
    labels = {s.path.name: s.label for s in dataset.test(cls)}
    assert labels == {"d1.npy": 1, "e1.txt": -1, "n1.pcd": 0, "u1.pcd": -1}
    embedded = next(s for s in dataset.test(cls) if s.path.name == "e1.txt").load()
    assert embedded.object_label == 1
    assert next(s for s in dataset.test(cls) if s.path.name == "u1.pcd").load().mask is None
    assert {s.path.name for s in dataset.train(cls)} == {"t0.pcd", "t1.npy"}


def test_folder_and_mvtec_truth_of_wrong_size_is_refused(tmp_path):
    write_folder(tmp_path / "f")
    labels = tmp_path / "f" / "test" / "n1.labels.txt"
    labels.write_text("0\n" * 5)
    dataset = open_dataset(f"folder:{tmp_path / 'f'}")
    sample = next(s for s in dataset.test("f") if s.path.name == "n1.pcd")
    with pytest.raises(GroundTruthError, match=r"n1\.labels\.txt: 5 labels but .*n1\.pcd has 220 points"):
        sample.load()
    write_mvtec3d(tmp_path / "m", classes=("bagel",))
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "m/bagel/test/crack/gt/000.png")
    crack = next(s for s in open_dataset(f"mvtec3d:{tmp_path / 'm'}").test("bagel") if s.label == 1)
    with pytest.raises(GroundTruthError, match=r"000\.png: mask is 8x8 pixels but .*000\.tiff is 16x20"):
        crack.load()


def test_defect_type_from_name():
    assert defect_type_from_name("ashtray0_bulge0", "positive") == "bulge"
    assert defect_type_from_name("ashtray0_positive3", "positive") == "good"
    assert defect_type_from_name("cup0_concavity12", "positive") == "concavity"
    assert defect_type_from_name("12_bulge", "good") == "bulge"
    assert defect_type_from_name("482_bulge_cut", "good") == "bulge"
    assert defect_type_from_name("13_sink", "good") == "other"
    assert defect_type_from_name("17_good", "good") == "good"


# ---------------------------------------------------------------- ground truth that does not fit


def test_gt_alignment_rejects_count_and_position_mismatch(tmp_path):
    points = sphere_cloud(100, seed=0)
    rows = np.column_stack([points, np.zeros(100)])
    rows[3, 3] = 1
    mask = align_gt_rows(points, rows, Path("s.pcd"), Path("g.txt"))
    assert mask.sum() == 1 and mask[3]
    with pytest.raises(GroundTruthError, match=r"g\.txt: 99 ground-truth rows but s\.pcd has 100 points"):
        align_gt_rows(points, rows[:99], Path("s.pcd"), Path("g.txt"))
    moved = rows.copy()
    moved[5, :3] += 0.05  # 2.5% of the diagonal: far beyond printing precision
    with pytest.raises(GroundTruthError, match=r"g\.txt: ground-truth points do not match s\.pcd"):
        align_gt_rows(points, moved, Path("s.pcd"), Path("g.txt"))
    bad_label = rows.copy()
    bad_label[0, 3] = 2
    with pytest.raises(GroundTruthError, match="0 or 1"):
        align_gt_rows(points, bad_label, Path("s.pcd"), Path("g.txt"))


def _break_shapenet(root: Path) -> dict[str, str]:
    """Missing GT, truncated GT, moved GT points, unreadable scan, orphan GT -> expected message parts."""
    base = root / "pcd" / "ashtray0"
    (base / "GT" / "ashtray0_bulge0.txt").unlink()
    gt = base / "GT" / "ashtray0_hole1.txt"
    gt.write_text("\n".join(gt.read_text().splitlines()[:-3]) + "\n")
    other = root / "pcd" / "bottle0" / "GT" / "bottle0_bulge0.txt"
    rows = np.loadtxt(other, delimiter=",")
    rows[:, 0] += 0.5
    np.savetxt(other, rows, fmt=["%.6f", "%.6f", "%.6f", "%d"], delimiter=",")
    (root / "pcd" / "bottle0" / "test" / "bottle0_positive0.pcd").write_text("not a pcd at all\n")
    (root / "pcd" / "bottle0" / "GT" / "bottle0_crack7.txt").write_text("0,0,0,1\n")
    return {
        "ashtray0_bulge0.pcd": "ground-truth file for",
        "ashtray0_hole1.pcd": "ground-truth rows but",
        "bottle0_bulge0.pcd": "do not match",
        "bottle0_positive0.pcd": "bottle0_positive0.pcd",
        "bottle0_crack7.txt": "no test scan",
    }


def test_sample_load_errors_name_both_files(tmp_path):
    write_anomaly_shapenet(tmp_path)
    _break_shapenet(tmp_path)
    dataset = open_dataset(f"anomaly-shapenet:{tmp_path}")
    by_name = {s.path.name: s for s in dataset.test("ashtray0") + dataset.test("bottle0")}
    with pytest.raises(GroundTruthError) as missing:
        by_name["ashtray0_bulge0.pcd"].load()
    assert "ashtray0_bulge0.txt" in str(missing.value) and "ashtray0_bulge0.pcd" in str(missing.value)
    with pytest.raises(GroundTruthError) as short:
        by_name["ashtray0_hole1.pcd"].load()
    assert "ashtray0_hole1.txt" in str(short.value) and "ashtray0_hole1.pcd" in str(short.value)
    with pytest.raises(ScanError, match="bottle0_positive0.pcd"):
        by_name["bottle0_positive0.pcd"].load()
    # a space-delimited GT file where the layout says commas is refused, not misread
    good = by_name["ashtray0_hole1.pcd"]
    space_gt = tmp_path / "space.txt"
    space_gt.write_text("0.1 0.2 0.3 0\n")
    with pytest.raises(GroundTruthError, match="comma-delimited"):
        Sample(good.path, good.cls, "test", 1, "hole", space_gt, good.gt_format).load()


def test_cli_reports_problems_per_file(tmp_path, capsys):
    root = tmp_path / "shapenet"
    write_anomaly_shapenet(root)
    expected = _break_shapenet(root)
    out = tmp_path / "out" / "summary.json"
    assert main([f"anomaly-shapenet:{root}", "--json", str(out)]) == 1
    document = json.loads(out.read_text())
    problems = {Path(p["path"]).name: p for p in document["problems"]}
    assert set(problems) == set(expected)
    for name, part in expected.items():
        assert part in problems[name]["message"], (name, problems[name]["message"])
    assert problems["ashtray0_bulge0.pcd"]["class"] == "ashtray0"
    rows = {row["class"]: row for row in document["classes"]}
    assert (rows["ashtray0"]["train"], rows["ashtray0"]["test"], rows["ashtray0"]["defective"]) == (2, 3, 2)
    assert rows["ashtray0"]["problems"] == 2 and rows["bottle0"]["problems"] == 3
    assert [p.name for p in out.parent.iterdir()] == ["summary.json"]  # no temp file left behind
    printed = capsys.readouterr().out
    assert "ashtray0_hole1.txt" in printed and "bottle0" in printed


def test_cli_json_content_on_clean_tree(tmp_path):
    manifest = write_real3d_ad(tmp_path / "r3d", n_points=200)
    out = tmp_path / "s.json"
    assert main([f"real3d-ad:{tmp_path / 'r3d'}", "--classes", "seahorse", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["layout"] == "real3d-ad" and document["problems"] == []
    [row] = document["classes"]
    wanted = manifest["seahorse"]
    test_masks = [e.mask for e in wanted if e.split == "test" and e.label == 1]
    sizes = [2 * 200] * 3 + [len(e.mask) for e in wanted if e.split == "test"]  # templates: 2 x n_points
    assert row["class"] == "seahorse"
    assert (row["train"], row["test"], row["defective"], row["validation"]) == (3, 3, 2, 0)
    assert row["points"] == {"min": min(sizes), "median": float(np.median(sizes)), "max": max(sizes)}
    assert row["anomalous_share_mean"] == pytest.approx(np.mean([m.mean() for m in test_masks]))


def test_cli_bad_spec_root_and_class(tmp_path, capsys):
    assert main(["nosuch:/tmp"]) == 2
    err = capsys.readouterr().err
    assert all(layout in err for layout in LAYOUTS)
    assert main([f"real3d-ad:{tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_real3d_ad(tmp_path / "r", classes=("seahorse",), n_points=100)
    assert main([f"real3d-ad:{tmp_path / 'r'}", "--classes", "dragon"]) == 2
    assert "dragon" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="remove_background"):
        open_dataset(f"real3d-ad:{tmp_path / 'r'}", remove_background=True)
    with pytest.raises(DatasetError, match="pcd/"):
        open_dataset(f"anomaly-shapenet:{tmp_path / 'r'}")


def test_cli_as_module_subprocess(tmp_path):
    root = tmp_path / "mv"
    write_mvtec3d(root, classes=("bagel",))
    (root / "bagel" / "test" / "crack" / "gt" / "001.png").unlink()
    out = tmp_path / "mv.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "evals.datasets", f"mvtec3d:{root}", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "001.png" in run.stdout
    document = json.loads(out.read_text())
    [problem] = document["problems"]
    assert problem["path"].endswith(os.path.join("crack", "xyz", "001.tiff"))
    assert "missing" in problem["message"]
