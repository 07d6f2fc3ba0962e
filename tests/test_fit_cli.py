"""agent.fit: fits a class from a folder or a dataset layout, prints what it fitted, and refuses bad input
with exit
code 2 and a message naming the file, folder or option — writing nothing in that case."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from agent.fit import EXIT_BAD_INPUT, EXIT_OK, FitInputError, FitOptions, fit_from_options, main
from detector.fitted import FittedClass
from scans.io import write_pcd
from scans.parts import part_mesh, sample_surface, scan_like
from tests.fixture_trees import sphere_cloud, write_anomaly_shapenet


def run(argv: list[str]) -> tuple[int, str]:
    buffer = io.StringIO()
    code = main([str(a) for a in argv], console=Console(file=buffer, width=240, force_terminal=False))
    return code, buffer.getvalue()


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    """Three normal scans of a procedural part (2,500 points: enough for the default 512 patches)."""
    folder = tmp_path_factory.mktemp("flange") / "train"
    mesh = part_mesh("flange")
    for i in range(3):
        clean, normals = sample_surface(mesh, 2500, seed=i)
        write_pcd(folder / f"flange_{i}.pcd", scan_like(clean, normals, seed=10 + i)[0].astype(np.float32))
    (folder / "README.md").write_text("not a scan: ignored\n")
    return folder


@pytest.fixture(scope="module")
def shapenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ashapenet")
    write_anomaly_shapenet(root, classes=("bottle0", "ashtray0"), n_points=1500)
    return root


@pytest.mark.slow  # Point-MAE at the CLI's default size: ~4 s quiet, far more on a busy box
def test_fit_a_training_folder_prints_a_summary_and_writes_a_loadable_fit(train_dir, tmp_path):
    out = tmp_path / "bank"
    code, text = run(["--train", train_dir, "--out", out, "--steps", 2, "--seed", 3])
    assert code == EXIT_OK, text
    for expected in (
        "training Point-MAE",
        "bank feature views",
        "training scans",
        "3 (2,500-2,500 points)",
        "bank",
        "peak memory",
        str(out),
    ):
        assert expected in text, expected
    fitted = FittedClass.load(out)
    assert fitted.config.feature == "pointmae" and fitted.config.train_steps == 2 and fitted.config.seed == 3
    assert fitted.info["class"] == "train" and fitted.info["n_train"] == 3
    assert [Path(n).name for n in fitted.info["train_names"]] == [
        "flange_0.pcd",
        "flange_1.pcd",
        "flange_2.pcd",
    ]


def test_fit_from_a_dataset_layout_with_the_btf_feature(shapenet_root, tmp_path):
    out = tmp_path / "bottle"
    stages: list[str] = []
    report = fit_from_options(
        FitOptions(
            out=out,
            data=f"anomaly-shapenet:{shapenet_root}",
            cls="bottle0",
            feature="fpfh",
            coreset_ratio=0.5,
        ),
        progress=lambda stage, done, total: stages.append(stage),
    )
    assert report.class_name == "bottle0" and report.feature == "fpfh"
    assert [Path(s).name for s in report.scans] == ["bottle0_template0.pcd", "bottle0_template1.pcd"]
    assert report.points == [1500, 1500]
    assert (
        report.patches == 2 * 4 * 512 and report.bank_size == report.patches // 2 and report.feature_dim == 33
    )
    assert report.peak_memory_mb > 50  # a python process with torch and open3d loaded
    assert set(stages) == {"read", "features"}  # no Point-MAE training for FPFH
    loaded = FittedClass.load(out)
    assert loaded.config.feature == "fpfh" and len(loaded.bank) == report.bank_size


def assert_refused(argv: list[str], out: Path, *fragments: str) -> str:
    code, text = run(argv)
    assert code == EXIT_BAD_INPUT, text
    flat = " ".join(text.split())
    for fragment in fragments:
        assert fragment in flat, (fragment, flat)
    assert not out.exists(), "a refused fit must not write its output folder"
    return flat


def test_unknown_class_lists_the_known_ones(shapenet_root, tmp_path):
    out = tmp_path / "x"
    assert_refused(
        ["--data", f"anomaly-shapenet:{shapenet_root}", "--cls", "teapot", "--out", out],
        out,
        "unknown class 'teapot'",
        "ashtray0, bottle0",
    )


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no-colon-here", "must look like <layout>:<root>"),
        ("martian:{root}", "unknown dataset layout 'martian'"),
        ("real3d-ad:{root}/nowhere", "does not exist"),
    ],
)
def test_bad_layout_spec(shapenet_root, tmp_path, spec, fragment):
    out = tmp_path / "x"
    assert_refused(
        ["--data", spec.format(root=shapenet_root), "--cls", "bottle0", "--out", out], out, fragment
    )


def test_missing_or_empty_training_folder(tmp_path):
    out = tmp_path / "x"
    missing = tmp_path / "no_such_dir"
    assert_refused(["--train", missing, "--out", out], out, f"{missing}: training folder does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt.bak").write_text("nothing")
    assert_refused(["--train", empty, "--out", out], out, f"{empty}: no scans in this folder")


def test_unreadable_scan_is_named(train_dir, tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    for src in sorted(train_dir.glob("*.pcd"))[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    bad = folder / "flange_9.pcd"
    bad.write_bytes(b"VERSION .7\nFIELDS x y z\n\x00\xff garbage")
    out = tmp_path / "x"
    assert_refused(
        ["--train", folder, "--out", out, "--feature", "fpfh"], out, "unreadable training scan", str(bad)
    )


def test_too_small_scan_is_named(tmp_path):
    folder = tmp_path / "train"
    write_pcd(folder / "big.pcd", sphere_cloud(2000, seed=1))
    write_pcd(folder / "small.pcd", sphere_cloud(200, seed=2))
    out = tmp_path / "x"
    assert_refused(
        ["--train", folder, "--out", out, "--feature", "fpfh"], out, f"{folder / 'small.pcd'}: has 200 points"
    )


def test_out_that_is_not_a_fit_is_left_alone(train_dir, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = run(["--train", train_dir, "--out", out, "--feature", "fpfh"])
    assert code == EXIT_BAD_INPUT and "not a fitted class folder" in " ".join(text.split())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_conflicting_or_missing_sources_and_bad_options(train_dir, shapenet_root, tmp_path):
    out = tmp_path / "x"
    assert_refused(
        [
            "--train",
            train_dir,
            "--data",
            f"anomaly-shapenet:{shapenet_root}",
            "--cls",
            "bottle0",
            "--out",
            out,
        ],
        out,
        "not both",
    )
    assert_refused(["--data", f"anomaly-shapenet:{shapenet_root}", "--out", out], out, "--cls")
    assert_refused(["--train", train_dir, "--out", out, "--coreset-ratio", "1.5"], out, "--coreset-ratio")
    assert_refused(["--train", train_dir, "--out", out, "--steps", "-1"], out, "--steps must be >= 0")
    assert_refused(
        ["--train", train_dir, "--out", out, "--init", tmp_path / "nobackbone"], out, "--init", "missing"
    )
    assert_refused(
        ["--train", train_dir, "--out", out, "--feature", "fpfh", "--init", tmp_path],
        out,
        "does not apply to --feature fpfh",
    )


def test_function_raises_for_callers(tmp_path):
    with pytest.raises(FitInputError, match="does not exist"):
        fit_from_options(FitOptions(out=tmp_path / "x", train=tmp_path / "nope"))


def test_register_flag_fits_a_registered_class_and_reports_the_alignment(train_dir, tmp_path):
    out = tmp_path / "registered"
    code, text = run(["--train", train_dir, "--out", out, "--feature", "fpfh", "--register"])
    assert code == 0, text
    assert "registration" in text and "flange_0.pcd" in text and "coordinate bank" in text
    loaded = FittedClass.load(out)
    assert loaded.config.register and loaded.coord_bank is not None and loaded.reference is not None
    assert min(loaded.info["registration_fitness"]) > 0.8
