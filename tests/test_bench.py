"""Procedural parts, scan simulation and the Anomaly-ShapeNet-layout benchmark builder."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from scans import bench
from scans.bench import BenchConfig, build_benchmark, main
from scans.defects import DEFECT_TYPES
from scans.io import read_scan
from scans.parts import PARTS, part_mesh, sample_surface, scan_like

TINY = BenchConfig(points=2000, templates=4, normal_per_class=2, defects_per_type=1, seed=3)


# ----------------------------------------------------------------------------------------------------------
# parts
@pytest.mark.parametrize("name", list(PARTS))
def test_parts_are_closed_solids(name: str) -> None:
    mesh = part_mesh(name)
    assert len(mesh.faces) > 1000 and mesh.area > 0
    assert mesh.volume > 0  # outward-facing normals
    # watertight-ish: the surface encloses its volume, so the divergence-theorem centroid lies inside the
    # bounds
    assert np.all(mesh.center_mass >= mesh.bounds[0]) and np.all(mesh.center_mass <= mesh.bounds[1])


def test_flange_and_nut_volumes_match_their_drawings() -> None:
    # flange: disc r50 x 10 with bore r15 and six r4.5 holes, hub r15..26 x 12 on top
    flange = np.pi * ((50**2 - 15**2) * 10 - 6 * 4.5**2 * 10 + (26**2 - 15**2) * 12)
    assert part_mesh("flange").volume == pytest.approx(flange, rel=0.01)
    # nut: hexagon 24 across flats x 13 with bore r8, washer face r8..11 x 1
    hexagon_area = 2 * np.sqrt(3) * 12.0**2
    nut = (hexagon_area - np.pi * 8**2) * 13 + np.pi * (11**2 - 8**2) * 1
    assert part_mesh("hex_nut").volume == pytest.approx(nut, rel=0.01)
    assert part_mesh("gear").is_watertight and part_mesh("pipe_elbow").is_watertight


def test_scan_like_is_noise_plus_a_small_rigid_motion() -> None:
    points, normals = sample_surface(part_mesh("gear"), 3000, seed=0)
    moved, _ = scan_like(points, normals, seed=1, noise=0.0)
    pairs = np.random.default_rng(0).integers(0, len(points), size=(500, 2))
    before = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
    after = np.linalg.norm(moved[pairs[:, 0]] - moved[pairs[:, 1]], axis=1)
    assert np.allclose(before, after, atol=1e-9)  # rigid
    assert 0 < np.abs(moved - points).max() < 0.1 * 80  # moved, but only a little (gear is ~80 mm)
    noisy, _ = scan_like(points, normals, seed=1, noise=0.003, max_rotation_deg=0.0, max_shift=0.0)
    along_normal = np.einsum("ij,ij->i", noisy - points, normals)
    assert np.std(along_normal) == pytest.approx(0.003 * 80, rel=0.15)
    # --pose-deg: a large pose change (an unaligned benchmark) turns the part by more than the fixture's play
    far, _ = scan_like(points, normals, seed=1, noise=0.0, max_rotation_deg=60.0, max_shift=0.0)
    turned_by = np.degrees(
        np.arccos(
            np.clip(
                (np.trace(np.linalg.lstsq(points - points.mean(0), far - far.mean(0), rcond=None)[0]) - 1)
                / 2,
                -1,
                1,
            )
        )
    )
    assert 4.0 < turned_by <= 60.0


# ----------------------------------------------------------------------------------------------------------
# builder
@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "tiny"
    build_benchmark(root, classes=["flange", "gear"], config=TINY, scans_dir=None)
    return root


def test_layout_matches_anomaly_shapenet(tiny_bench: Path) -> None:
    for name in ("flange", "gear"):
        base = tiny_bench / "pcd" / name
        assert sorted(p.name for p in (base / "train").iterdir()) == [
            f"{name}_template{i}.pcd" for i in range(4)
        ]
        expected_test = {f"{name}_positive{i}.pcd" for i in range(2)} | {
            f"{name}_{k}0.pcd" for k in DEFECT_TYPES
        }
        assert {p.name for p in (base / "test").iterdir()} == expected_test
        assert {p.name for p in (base / "GT").iterdir()} == {f"{name}_{k}0.txt" for k in DEFECT_TYPES}
    assert sorted(p.name for p in tiny_bench.iterdir()) == ["manifest.json", "pcd", "recipe.json"]
    assert not list(tiny_bench.parent.glob("*.tmp"))


def test_gt_rows_are_the_pcd_points(tiny_bench: Path) -> None:
    for gt in sorted(tiny_bench.glob("pcd/*/GT/*.txt")):
        rows = np.loadtxt(gt, delimiter=",", ndmin=2)
        scan = read_scan(gt.parent.parent / "test" / f"{gt.stem}.pcd")
        assert rows.shape == (len(scan.points), 4)
        assert np.array_equal(rows[:, :3].astype(np.float32), scan.points)
        assert set(np.unique(rows[:, 3])) == {0.0, 1.0}
        assert 0.01 <= rows[:, 3].mean() <= 0.08, gt.name
    for normal in tiny_bench.glob("pcd/*/*/*positive*.pcd"):
        assert 1500 <= len(read_scan(normal).points) <= 2000


def test_recipe_and_manifest_describe_the_files(tiny_bench: Path) -> None:
    recipe = json.loads((tiny_bench / "recipe.json").read_text())
    assert recipe["recipe_version"] == bench.RECIPE_VERSION and recipe["seed"] == 3
    assert recipe["pose_deg"] == TINY.pose_deg == 4.0  # pre-aligned unless --pose-deg asks for more
    assert set(recipe["sources"]) == {"flange", "gear"}
    defects = [r["defect"] for r in recipe["samples"]["gear"] if r["defect"]]
    assert sorted(d["type"] for d in defects) == sorted(DEFECT_TYPES)
    gt = np.loadtxt(tiny_bench / "pcd/gear/GT/gear_bulge0.txt", delimiter=",")
    bulge = next(d for d in defects if d["type"] == "bulge")
    assert bulge["share"] == pytest.approx(gt[:, 3].mean())
    manifest = json.loads((tiny_bench / "manifest.json").read_text())
    on_disk = {p.relative_to(tiny_bench).as_posix() for p in tiny_bench.rglob("*") if p.is_file()}
    assert set(manifest["files"]) | {"manifest.json"} == on_disk
    some = "pcd/flange/test/flange_hole0.pcd"
    assert manifest["files"][some]["sha256"] == hashlib.sha256((tiny_bench / some).read_bytes()).hexdigest()
    assert manifest["classes"]["flange"] == {
        "train": 4,
        "test_normal": 2,
        "test_defective": len(DEFECT_TYPES),
    }


def test_a_class_does_not_depend_on_the_others(tiny_bench: Path, tmp_path: Path) -> None:
    alone = tmp_path / "alone"
    build_benchmark(alone, classes=["gear"], config=TINY, scans_dir=None)
    for path in (alone / "pcd" / "gear").rglob("*.*"):
        twin = tiny_bench / path.relative_to(alone)
        assert path.read_bytes() == twin.read_bytes(), path.name


def test_existing_output_is_left_alone_and_failures_leave_nothing(tmp_path: Path, monkeypatch) -> None:
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_benchmark(existing, classes=["gear"], config=TINY, scans_dir=None)
    assert (existing / "keep.txt").read_text() == "mine"

    calls = []

    def failing(source, class_dir, config):
        calls.append(source.name)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(source, class_dir, config)

    real = bench.build_class
    monkeypatch.setattr(bench, "build_class", failing)
    target = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="disk full"):
        build_benchmark(target, classes=["flange", "gear"], config=TINY, scans_dir=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_builds_and_refuses_unknown_classes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert (
        main(
            [
                "--out",
                str(out),
                "--classes",
                "hex_nut",
                "--points",
                "1000",
                "--normal",
                "1",
                "--defects",
                "hole",
                "bulge",
                "--workers",
                "1",
                "--scans",
                str(tmp_path / "none"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "hex_nut" in printed and "built" in printed
    assert (out / "pcd/hex_nut/GT/hex_nut_hole0.txt").is_file()
    assert main(["--out", str(tmp_path / "x"), "--classes", "teapot", "--scans", str(tmp_path)]) == 2
    assert "teapot" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "y"), "--pose-deg", "-5"]) == 2 and not (tmp_path / "y").exists()
    assert "pose_deg" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "z"), "--severity", "0"]) == 2 and not (tmp_path / "z").exists()
    assert "severity" in capsys.readouterr().err


def _record_keyword(monkeypatch, module, function: str, keyword: str) -> list:
    """Wrap `module.function` so each call's `keyword` argument is appended to the returned list."""
    seen: list = []
    real = getattr(module, function)

    def recording(*args, **kwargs):
        seen.append(kwargs[keyword])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, function, recording)
    return seen


def test_severity_is_recorded_and_reaches_every_defect(tmp_path: Path, monkeypatch) -> None:
    """--severity is passed to every defect of the build and written in recipe.json."""
    seen = _record_keyword(monkeypatch, bench.defect_lib, "make_defect", "severity")
    args = ["--classes", "hex_nut", "--points", "800", "--normal", "0", "--defects", "hole", "bulge",
            "--workers", "1", "--scans", str(tmp_path / "none"), "--severity", "0.5"]
    assert main(["--out", str(tmp_path / "subtle"), *args]) == 0
    assert seen == [0.5, 0.5]
    recipe = json.loads((tmp_path / "subtle" / "recipe.json").read_text())
    assert recipe["severity"] == 0.5


def test_pose_deg_reaches_every_sample(tmp_path: Path, monkeypatch) -> None:
    """--pose-deg is the rotation every sample of the build gets (templates and tests alike)."""
    seen = _record_keyword(monkeypatch, bench.part_lib, "scan_like", "max_rotation_deg")
    assert (
        main(
            [
                "--out",
                str(tmp_path / "turned"),
                "--classes",
                "hex_nut",
                "--points",
                "800",
                "--normal",
                "1",
                "--defects",
                "hole",
                "--workers",
                "1",
                "--scans",
                str(tmp_path / "none"),
                "--pose-deg",
                "45",
            ]
        )
        == 0
    )
    assert seen and set(seen) == {45.0}
    recipe = json.loads((tmp_path / "turned" / "recipe.json").read_text())
    assert recipe["pose_deg"] == 45.0


@pytest.mark.slow
def test_real_scans_and_pictures(tmp_path: Path) -> None:
    scans = bench.DEFAULT_SCANS
    if not (scans / "pcl" / "milk.pcd").is_file():
        pytest.skip("real scans not present")
    out = tmp_path / "real"
    summary = build_benchmark(
        out,
        classes=["bunny", "milk"],
        scans_dir=scans,
        config=BenchConfig(points=3000, normal_per_class=1, seed=1),
    )
    assert set(summary["classes"]) == {"bunny", "milk"}
    for gt in out.glob("pcd/*/GT/*.txt"):
        assert 0.01 <= np.loadtxt(gt, delimiter=",")[:, 3].mean() <= 0.08, gt.name
    png = bench.render_examples(out, tmp_path / "examples.png", max_samples=2)
    assert png.stat().st_size > 10_000
