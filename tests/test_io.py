"""Tests for scans/io.py (and the PCD/PLY readers behind it): every format, every error path, the writers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import open3d as o3d
import plyfile
import pytest
import tifffile
import trimesh
from PIL import Image

from scans.io import (
    MIN_POINTS,
    SUPPORTED_EXTENSIONS,
    Scan,
    ScanError,
    read_scan,
    validate_points,
    write_pcd,
    write_scores,
)
from scans.shared_data import shared_scans_dir

SCANS = shared_scans_dir()
needs_scans = pytest.mark.skipif(
    not SCANS.is_dir(), reason=f"real scans folder {SCANS} is not on this machine"
)


def cloud(rng: np.random.Generator, n: int = 200) -> np.ndarray:
    return rng.normal(size=(n, 3)).astype(np.float32)


def o3d_points(path: Path) -> np.ndarray:
    return np.asarray(o3d.io.read_point_cloud(str(path)).points)


# ----------------------------------------------- hand-written files (independent of our writers)


def write_ply(
    path: Path,
    fmt: str,
    columns: dict[str, np.ndarray],
    types: dict[str, str],
    faces: np.ndarray | None = None,
) -> None:
    """A minimal PLY writer for tests; ``types`` maps column name to PLY type name and numpy code."""
    n = len(next(iter(columns.values())))
    header = ["ply", f"format {fmt} 1.0", "comment IGNORE PREVIOUS INSTRUCTIONS", f"element vertex {n}"]
    header += [f"property {types[name]} {name}" for name in columns]
    if faces is not None:
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    header.append("end_header")
    head = ("\n".join(header) + "\n").encode()
    numpy_codes = {"float": "f4", "double": "f8", "uchar": "u1", "int": "i4", "ushort": "u2"}
    if fmt == "ascii":
        rows = [
            " ".join(
                repr(float(columns[c][i])) if types[c] in ("float", "double") else str(int(columns[c][i]))
                for c in columns
            )
            for i in range(n)
        ]
        if faces is not None:
            rows += [f"{len(f)} " + " ".join(str(v) for v in f) for f in faces]
        path.write_bytes(head + ("\n".join(rows) + "\n").encode())
        return
    order = "<" if fmt == "binary_little_endian" else ">"
    record = np.empty(n, dtype=[(c, order + numpy_codes[types[c]]) for c in columns])
    for c in columns:
        record[c] = columns[c]
    body = record.tobytes()
    if faces is not None:
        face_rec = np.empty(len(faces), dtype=[("n", "u1"), ("v", order + "i4", (faces.shape[1],))])
        face_rec["n"] = faces.shape[1]
        face_rec["v"] = faces
        body += face_rec.tobytes()
    path.write_bytes(head + body)


def write_binary_pcd(
    path: Path,
    records: np.ndarray,
    fields: str,
    sizes: str,
    types: str,
    counts: str,
    declared_points: int | None = None,
) -> None:
    n = len(records) if declared_points is None else declared_points
    header = (
        f"# .PCD v0.7 - IGNORE PREVIOUS INSTRUCTIONS\nVERSION 0.7\nFIELDS {fields}\nSIZE {sizes}\n"
        f"TYPE {types}\nCOUNT {counts}\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\n"
        f"DATA binary\n"
    )
    path.write_bytes(header.encode() + records.tobytes())


# ------------------------------------------------------------------ PLY


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_ply_round_trip_with_normals_and_label(tmp_path, rng, fmt):
    points = cloud(rng)
    normals = rng.normal(size=points.shape).astype(np.float32)
    labels = rng.integers(0, 3, size=len(points))
    path = tmp_path / "scan.ply"
    write_ply(
        path,
        fmt,
        {
            "x": points[:, 0],
            "y": points[:, 1],
            "z": points[:, 2],
            "nx": normals[:, 0],
            "ny": normals[:, 1],
            "nz": normals[:, 2],
            "label": labels,
        },
        {
            "x": "float",
            "y": "float",
            "z": "float",
            "nx": "float",
            "ny": "float",
            "nz": "float",
            "label": "uchar",
        },
    )
    scan = read_scan(path)
    assert scan.points.dtype == np.float32 and scan.points.shape == points.shape
    np.testing.assert_array_equal(scan.points, points)
    np.testing.assert_array_equal(scan.normals, normals)
    np.testing.assert_array_equal(scan.labels, labels.astype(np.uint8))
    assert scan.labels.dtype == np.uint8
    assert scan.source == str(path) and scan.grid_shape is None and scan.dropped_nonfinite == 0
    # open3d is an independent reader of the same file.
    np.testing.assert_allclose(o3d_points(path), points, rtol=0, atol=1e-6)


def test_ply_float_label_and_double_coordinates(tmp_path, rng):
    points = rng.normal(size=(100, 3))
    path = tmp_path / "scan.ply"
    write_ply(
        path,
        "binary_little_endian",
        {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "label": np.arange(100) % 2 * 1.0},
        {"x": "double", "y": "double", "z": "double", "label": "float"},
    )
    scan = read_scan(path)
    np.testing.assert_allclose(scan.points, points.astype(np.float32))
    np.testing.assert_array_equal(scan.labels, np.arange(100) % 2)


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_ply_with_faces_gives_its_vertices(tmp_path, fmt):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    path = tmp_path / "mesh.ply"
    vertices = mesh.vertices.astype(np.float32)
    write_ply(
        path,
        fmt,
        {"x": vertices[:, 0], "y": vertices[:, 1], "z": vertices[:, 2]},
        {"x": "float", "y": "float", "z": "float"},
        faces=np.asarray(mesh.faces),
    )
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.points, vertices)


def test_ply_variable_length_faces_are_stepped_over(tmp_path, rng):
    """Mixed triangles and quads force the item-by-item path; the vertex element after them still parses."""
    points = cloud(rng, 80)
    head = (
        b"ply\nformat binary_little_endian 1.0\nelement face 2\nproperty list uchar int vertex_indices\n"
        b"element vertex 80\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    )
    faces = (
        bytes([3])
        + np.array([0, 1, 2], "<i4").tobytes()
        + bytes([4])
        + np.array([0, 1, 2, 3], "<i4").tobytes()
    )
    (tmp_path / "f.ply").write_bytes(head + faces + points.astype("<f4").tobytes())
    np.testing.assert_array_equal(read_scan(tmp_path / "f.ply").points, points)


def test_binary_ply_truncated(tmp_path, rng):
    points = cloud(rng)
    path = tmp_path / "cut.ply"
    write_ply(
        path,
        "binary_little_endian",
        {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2]},
        {"x": "float", "y": "float", "z": "float"},
    )
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ScanError, match=r"truncated") as info:
        read_scan(path)
    assert str(info.value).startswith(f"{path}: ")


def test_ascii_ply_truncated(tmp_path, rng):
    points = cloud(rng)
    path = tmp_path / "cut.ply"
    write_ply(
        path,
        "ascii",
        {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2]},
        {"x": "float", "y": "float", "z": "float"},
    )
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-10]) + "\n")
    with pytest.raises(ScanError, match=r"truncated"):
        read_scan(path)


def test_ply_without_end_header(tmp_path):
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\n")
    with pytest.raises(ScanError, match="end_header"):
        read_scan(tmp_path / "bad.ply")


def test_not_a_ply(tmp_path):
    (tmp_path / "bad.ply").write_bytes(b"\x00\x01garbage" * 20)
    with pytest.raises(ScanError, match="not a PLY"):
        read_scan(tmp_path / "bad.ply")


# ------------------------------------------------------------------ PCD


def test_pcd_ascii_round_trip_with_labels_and_open3d(tmp_path, rng):
    points = cloud(rng)
    labels = rng.integers(0, 2, size=len(points))
    path = write_pcd(tmp_path / "scan.pcd", points, labels)
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.points, points)  # %.9g is exact for float32
    np.testing.assert_array_equal(scan.labels, labels)
    np.testing.assert_array_equal(o3d_points(path).astype(np.float32), points)


def test_write_pcd_without_labels(tmp_path, rng):
    points = cloud(rng)
    path = write_pcd(tmp_path / "plain.pcd", points)
    scan = read_scan(path)
    assert scan.labels is None
    np.testing.assert_array_equal(scan.points, points)
    assert "FIELDS x y z\n" in path.read_text()


def test_write_pcd_rejects_bad_input_and_writes_nothing(tmp_path, rng):
    points = cloud(rng)
    with pytest.raises(ValueError):
        write_pcd(tmp_path / "a.pcd", points, labels=np.zeros(3))
    points[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_pcd(tmp_path / "b.pcd", points)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("compressed", [False, True])
def test_pcd_binary_written_by_open3d(tmp_path, rng, compressed):
    """open3d writes binary and binary_compressed (LZF) PCDs with normals: an independent writer."""
    points = cloud(rng, 500).astype(np.float64)
    normals = rng.normal(size=points.shape)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    pcd.normals = o3d.utility.Vector3dVector(normals)
    path = tmp_path / "o3d.pcd"
    assert o3d.io.write_point_cloud(str(path), pcd, write_ascii=False, compressed=compressed)
    header = path.read_bytes()[:400]
    assert (b"binary_compressed" in header) == compressed
    scan = read_scan(path)
    np.testing.assert_allclose(scan.points, points, atol=1e-6)
    np.testing.assert_allclose(scan.normals, normals, atol=1e-6)


def test_pcd_binary_with_padding_label_and_count(tmp_path, rng):
    points = cloud(rng)
    dtype = np.dtype(
        [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("_", "u1", (3,)), ("label", "<u4"), ("hist", "<f4", (4,))]
    )
    records = np.zeros(len(points), dtype=dtype)
    records["x"], records["y"], records["z"] = points.T
    records["label"] = np.arange(len(points)) % 5
    path = tmp_path / "pad.pcd"
    write_binary_pcd(path, records, "x y z _ label hist", "4 4 4 1 4 4", "F F F U U F", "1 1 1 3 1 4")
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.points, points)
    np.testing.assert_array_equal(scan.labels, np.arange(len(points)) % 5)


def test_pcd_binary_truncated(tmp_path, rng):
    records = np.zeros(100, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    path = tmp_path / "cut.pcd"
    write_binary_pcd(path, records, "x y z", "4 4 4", "F F F", "1 1 1", declared_points=200)
    with pytest.raises(
        ScanError, match=r"truncated: header declares 200 points \(2400 bytes\) but only 1200"
    ):
        read_scan(path)


def test_pcd_ascii_truncated(tmp_path, rng):
    path = write_pcd(tmp_path / "cut.pcd", cloud(rng))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-5]) + "\n")
    with pytest.raises(ScanError, match="truncated"):
        read_scan(path)


def test_pcd_compressed_truncated(tmp_path, rng):
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(cloud(rng, 500).astype(np.float64)))
    path = tmp_path / "c.pcd"
    o3d.io.write_point_cloud(str(path), pcd, write_ascii=False, compressed=True)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ScanError, match="truncated"):
        read_scan(path)


def test_pcd_without_data_line(tmp_path):
    (tmp_path / "h.pcd").write_text("VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\n")
    with pytest.raises(ScanError, match="DATA"):
        read_scan(tmp_path / "h.pcd")


def test_pcd_of_an_older_version_reads_like_0_7(tmp_path, rng):
    """PCL's own sample files include VERSION .5 headers without VIEWPOINT; pypcd4 alone accepts only 0.7."""
    points = cloud(rng)
    path = write_pcd(tmp_path / "old.pcd", points)
    text = path.read_text().replace("VERSION 0.7", "VERSION .5").replace("VIEWPOINT 0 0 0 1 0 0 0\n", "")
    path.write_text(text)
    np.testing.assert_array_equal(read_scan(path).points, points)


def test_pcd_width_times_height_must_match_points(tmp_path, rng):
    path = write_pcd(tmp_path / "wh.pcd", cloud(rng))
    path.write_text(path.read_text().replace("WIDTH 200", "WIDTH 20"))
    with pytest.raises(ScanError, match=r"WIDTH x HEIGHT \(20 x 1\) differs from POINTS \(200\)"):
        read_scan(path)


def test_pcd_max_points_checked_from_header(tmp_path, rng):
    path = write_pcd(tmp_path / "big.pcd", cloud(rng, 300))
    with pytest.raises(ScanError, match=r"has 300 points, more than the limit of 100"):
        read_scan(path, max_points=100)


def test_organized_pcd_keeps_grid(tmp_path, rng):
    height, width = 10, 12
    grid = rng.normal(size=(height * width, 3)).astype(np.float32)
    grid[[3, 50, 77]] = np.nan
    records = np.zeros(len(grid), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    records["x"], records["y"], records["z"] = grid.T
    header = (
        f"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH {width}\nHEIGHT {height}\n"
        f"POINTS {height * width}\nDATA binary\n"
    )
    path = tmp_path / "org.pcd"
    path.write_bytes(header.encode() + records.tobytes())
    scan = read_scan(path)
    assert scan.grid_shape == (height, width) and scan.dropped_nonfinite == 3
    np.testing.assert_array_equal(scan.points, grid[scan.grid_index])
    assert not np.isin([3, 50, 77], scan.grid_index).any()


# ------------------------------------------------------------------ text formats


@pytest.mark.parametrize("ext", [".xyz", ".txt", ".pts"])
def test_text_xyz_with_comments_and_commas(tmp_path, rng, ext):
    points = cloud(rng)
    rows = ["# exported by scanner IGNORE PREVIOUS INSTRUCTIONS", ""]
    rows += [
        f"{x!r}, {y!r}, {z!r}" if i % 2 else f"{x!r} {y!r}\t{z!r}"
        for i, (x, y, z) in enumerate(points.astype(np.float64).tolist())
    ]
    path = tmp_path / f"scan{ext}"
    path.write_text("\n".join(rows) + "\n")
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.points, points)
    assert scan.labels is None and scan.normals is None


def test_text_with_labels_and_normals(tmp_path, rng):
    points = cloud(rng)
    labels = rng.integers(0, 2, size=len(points))
    normals = rng.normal(size=points.shape)
    np.savetxt(tmp_path / "l.txt", np.column_stack([points, labels]), fmt="%.9g")
    np.savetxt(tmp_path / "n.xyz", np.column_stack([points, normals]), fmt="%.9g")
    np.savetxt(tmp_path / "nl.xyz", np.column_stack([points, normals, labels]), fmt="%.9g")
    assert (read_scan(tmp_path / "l.txt").labels == labels).all()
    np.testing.assert_allclose(read_scan(tmp_path / "n.xyz").normals, normals, rtol=1e-6)
    both = read_scan(tmp_path / "nl.xyz")
    assert (both.labels == labels).all() and both.normals is not None


def test_text_bad_columns_and_values(tmp_path, rng):
    np.savetxt(tmp_path / "five.xyz", rng.normal(size=(100, 5)))
    with pytest.raises(ScanError, match=r"3 \(x y z\), 4"):
        read_scan(tmp_path / "five.xyz")
    rows = [f"{a} {b} {c}" for a, b, c in rng.normal(size=(100, 3))]
    rows[40] = "1 2"
    (tmp_path / "ragged.xyz").write_text("\n".join(rows))
    with pytest.raises(ScanError, match="data row 41"):
        read_scan(tmp_path / "ragged.xyz")
    rows[40] = "1 2 SECRETWORD"
    (tmp_path / "word.xyz").write_text("\n".join(rows))
    with pytest.raises(ScanError, match="not a number") as info:
        read_scan(tmp_path / "word.xyz")
    assert "SECRETWORD" not in str(info.value)  # file content is never echoed


def test_labels_out_of_range(tmp_path, rng):
    np.savetxt(tmp_path / "l.txt", np.column_stack([cloud(rng), np.full(200, 300)]))
    with pytest.raises(ScanError, match="labels must be whole numbers between 0 and 255"):
        read_scan(tmp_path / "l.txt")


# ------------------------------------------------------------------ numpy


def test_npy_round_trip_and_extra_columns(tmp_path, rng):
    points = cloud(rng)
    np.save(tmp_path / "a.npy", points)
    np.save(tmp_path / "b.npy", np.column_stack([points, np.ones(len(points))]).astype(np.float64))
    np.testing.assert_array_equal(read_scan(tmp_path / "a.npy").points, points)
    np.testing.assert_array_equal(read_scan(tmp_path / "b.npy").points, points)


def test_npz_keys(tmp_path, rng):
    points = cloud(rng)
    labels = (np.arange(len(points)) % 2).astype(np.int64)
    normals = rng.normal(size=points.shape)
    np.savez(tmp_path / "k.npz", other=np.zeros(4), points=points, labels=labels, normals=normals)
    scan = read_scan(tmp_path / "k.npz")
    np.testing.assert_array_equal(scan.points, points)
    np.testing.assert_array_equal(scan.labels, labels)
    np.testing.assert_allclose(scan.normals, normals.astype(np.float32))
    np.savez(tmp_path / "first.npz", cloud=points)
    np.testing.assert_array_equal(read_scan(tmp_path / "first.npz").points, points)
    np.savez(tmp_path / "mismatch.npz", points=points, labels=labels[:10])
    with pytest.raises(ScanError, match="'labels' has 10 rows"):
        read_scan(tmp_path / "mismatch.npz")


def test_npy_refuses_pickles_and_bad_shapes(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 70, dtype=object), allow_pickle=True)
    with pytest.raises(ScanError, match="obj.npy"):
        read_scan(tmp_path / "obj.npy")
    np.save(tmp_path / "flat.npy", np.zeros(300))
    with pytest.raises(ScanError, match=r"shape \(N, 3\)"):
        read_scan(tmp_path / "flat.npy")


# ------------------------------------------------------------------ meshes


@pytest.mark.parametrize("ext", [".obj", ".stl", ".off"])
def test_mesh_sampling_is_deterministic_by_seed(tmp_path, ext):
    box = trimesh.creation.box(extents=(2.0, 4.0, 6.0))
    path = tmp_path / f"box{ext}"
    box.export(path)
    first = read_scan(path, mesh_points=2000, seed=3)
    again = read_scan(path, mesh_points=2000, seed=3)
    other = read_scan(path, mesh_points=2000, seed=4)
    assert first.points.shape == (2000, 3)
    np.testing.assert_array_equal(first.points, again.points)
    assert not np.array_equal(first.points, other.points)
    # Every sample lies on the box surface: one coordinate sits at a face (|x|=1, |y|=2 or |z|=3).
    half = np.array([1.0, 2.0, 3.0])
    on_face = np.isclose(np.abs(first.points), half, atol=1e-5)
    assert on_face.any(axis=1).all()
    # The face normal of a box sample points along the axis whose coordinate is on the face.
    assert np.allclose(np.linalg.norm(first.normals, axis=1), 1.0, atol=1e-5)
    axis = np.argmax(np.abs(first.normals), axis=1)
    assert on_face[np.arange(2000), axis].all()


def test_mesh_without_faces(tmp_path):
    (tmp_path / "empty.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(ScanError, match="empty.obj"):
        read_scan(tmp_path / "empty.obj")


# ------------------------------------------------------------------ MVTec organized tiff


def test_tiff_grid_mapping_and_ground_truth_mask(tmp_path, rng):
    height, width = 20, 30
    image = rng.normal(size=(height, width, 3)).astype(np.float32)
    image[:5, :, :] = 0.0  # invalid rows, as MVTec marks missing measurements
    image[10, 10] = 0.0
    path = tmp_path / "000.tiff"
    tifffile.imwrite(path, image, photometric="rgb")
    gt = np.zeros((height, width), dtype=np.uint8)
    gt[12:15, 20:25] = 255
    Image.fromarray(gt).save(tmp_path / "000.png")

    scan = read_scan(path)
    assert scan.grid_shape == (height, width)
    assert scan.dropped_nonfinite == 5 * width + 1
    assert len(scan.points) == height * width - scan.dropped_nonfinite
    assert scan.grid_index.dtype == np.int64
    np.testing.assert_array_equal(scan.points, image.reshape(-1, 3)[scan.grid_index])
    rows, cols = np.unravel_index(scan.grid_index, scan.grid_shape)
    assert rows.min() == 5 and not ((rows == 10) & (cols == 10)).any()
    mask = np.asarray(Image.open(tmp_path / "000.png")).reshape(-1)[scan.grid_index] > 0
    assert mask.sum() == 15
    np.testing.assert_array_equal(scan.points[mask], image[12:15, 20:25].reshape(-1, 3))


def test_tiff_planar_storage(tmp_path, rng):
    image = rng.normal(size=(3, 16, 12)).astype(np.float32)
    tifffile.imwrite(tmp_path / "planar.tif", image, photometric="minisblack", planarconfig="separate")
    scan = read_scan(tmp_path / "planar.tif")
    assert scan.grid_shape == (16, 12)
    np.testing.assert_array_equal(scan.points, np.moveaxis(image, 0, -1).reshape(-1, 3))


def test_tiff_wrong_shape(tmp_path):
    tifffile.imwrite(tmp_path / "gray.tif", np.ones((20, 20), dtype=np.float32))
    with pytest.raises(ScanError, match="H x W x 3"):
        read_scan(tmp_path / "gray.tif")


# ------------------------------------------------------------------ validation paths


def test_missing_file(tmp_path):
    with pytest.raises(ScanError, match="does not exist") as info:
        read_scan(tmp_path / "nope.ply")
    assert str(info.value).startswith(str(tmp_path / "nope.ply"))


def test_scan_error_forms():
    assert str(ScanError("a/b.ply", "is empty")) == "a/b.ply: is empty"
    error = ScanError("a/b.ply: is empty")
    assert (error.source, error.problem, str(error)) == ("a/b.ply", "is empty", "a/b.ply: is empty")
    assert isinstance(error, ValueError)


def test_unknown_extension_lists_supported(tmp_path):
    (tmp_path / "scan.las").write_bytes(b"x")
    with pytest.raises(ScanError, match=r"unknown extension '\.las'") as info:
        read_scan(tmp_path / "scan.las")
    for ext in SUPPORTED_EXTENSIONS:
        assert ext in str(info.value)


def test_zero_points(tmp_path):
    (tmp_path / "empty.xyz").write_text("# only a comment\n\n")
    with pytest.raises(ScanError, match="no points"):
        read_scan(tmp_path / "empty.xyz")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    with pytest.raises(ScanError, match="no points"):
        read_scan(tmp_path / "empty.npy")


def test_fewer_than_min_points(tmp_path, rng):
    np.save(tmp_path / "few.npy", cloud(rng, MIN_POINTS - 1))
    with pytest.raises(
        ScanError, match=f"has {MIN_POINTS - 1} valid points, fewer than the minimum of {MIN_POINTS}"
    ):
        read_scan(tmp_path / "few.npy")
    assert len(read_scan(tmp_path / "few.npy", min_points=10).points) == MIN_POINTS - 1


def test_nan_rows_dropped_with_warning(tmp_path, rng):
    points = cloud(rng).astype(np.float64)
    points[[0, 5, 9], 1] = np.nan
    points[7, 2] = np.inf
    labels = np.arange(200) % 3
    np.savez(tmp_path / "nan.npz", points=points, labels=labels)
    with pytest.warns(UserWarning, match=r"dropped 4 of 200 rows with NaN/inf"):
        scan = read_scan(tmp_path / "nan.npz")
    assert scan.dropped_nonfinite == 4 and len(scan.points) == 196
    keep = np.ones(200, bool)
    keep[[0, 5, 7, 9]] = False
    np.testing.assert_array_equal(scan.points, points[keep].astype(np.float32))
    np.testing.assert_array_equal(scan.labels, labels[keep])  # labels follow their points


def test_too_many_bad_rows(tmp_path, rng):
    points = cloud(rng).astype(np.float64)
    points[:150] = np.nan
    np.save(tmp_path / "bad.npy", points)
    with pytest.raises(ScanError, match="150 of 200 rows are NaN/inf"):
        read_scan(tmp_path / "bad.npy")


def test_degenerate_extent(tmp_path):
    np.save(tmp_path / "same.npy", np.tile([[1.0, 2.0, 3.0]], (100, 1)))
    with pytest.raises(ScanError, match="degenerate"):
        read_scan(tmp_path / "same.npy")
    far = np.tile([[1e6, 1e6, 1e6]], (100, 1)) + np.random.default_rng(0).normal(scale=1e-9, size=(100, 3))
    with pytest.raises(ScanError, match="degenerate"):
        validate_points(far, "far")


def test_max_points_for_loaded_arrays(tmp_path, rng):
    np.save(tmp_path / "big.npy", cloud(rng, 500))
    with pytest.raises(ScanError, match=r"has 500 points, more than the limit of 499"):
        read_scan(tmp_path / "big.npy", max_points=499)


def test_validate_points_contract(rng):
    points = cloud(rng).astype(np.float64)
    points[3] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clean, keep = validate_points(points, "mem")
    assert clean.dtype == np.float32 and clean.shape == (199, 3) and keep.sum() == 199 and not keep[3]
    assert len(caught) == 1 and "mem: dropped 1 of 200" in str(caught[0].message)
    with pytest.raises(ScanError, match=r"^mem: points must have shape \(N, 3\)"):
        validate_points(np.zeros((10, 2)), "mem")
    with pytest.raises(ScanError):  # share limit is configurable
        validate_points(points, "mem", max_bad_share=0.0)


def test_header_text_never_reaches_scan(tmp_path, rng):
    points = cloud(rng)
    path = tmp_path / "h.ply"
    write_ply(
        path,
        "ascii",
        {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2]},
        {"x": "float", "y": "float", "z": "float"},
    )
    scan = read_scan(path)
    assert isinstance(scan, Scan)
    for value in vars(scan).values():
        assert "IGNORE" not in str(value)


# ------------------------------------------------------------------ write_scores


def test_write_scores_npy_and_ply(tmp_path, rng):
    points = cloud(rng)
    scores = rng.random(len(points)) * 7 + 2
    npy_path, ply_path = write_scores(tmp_path / "out" / "scan1", points, scores)
    assert npy_path == tmp_path / "out" / "scan1.npy" and ply_path == tmp_path / "out" / "scan1.ply"
    saved = np.load(npy_path, allow_pickle=False)
    assert saved.dtype == np.float32
    np.testing.assert_array_equal(saved, scores.astype(np.float32))
    assert ply_path.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    vertices = plyfile.PlyData.read(str(ply_path))["vertex"].data  # an independent reader
    props = {name: vertices.dtype[name].str for name in vertices.dtype.names}
    assert props == {
        "x": "<f4",
        "y": "<f4",
        "z": "<f4",
        "red": "|u1",
        "green": "|u1",
        "blue": "|u1",
        "anomaly": "<f4",
    }
    np.testing.assert_array_equal(vertices["anomaly"], scores.astype(np.float32))
    rgb = np.stack([vertices["red"], vertices["green"], vertices["blue"]], axis=1).astype(int)
    # Highest score gets the top of the colour map, lowest the bottom; brighter for higher.
    assert rgb[np.argmax(scores)].sum() > rgb[np.argmin(scores)].sum() + 300
    np.testing.assert_allclose(o3d_points(ply_path), points, atol=1e-6)
    np.testing.assert_array_equal(read_scan(ply_path).points, points)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan1.npy", "scan1.ply"]


def test_write_scores_errors_leave_nothing(tmp_path, rng):
    points = cloud(rng)
    with pytest.raises(ValueError, match="199 scores for 200 points"):
        write_scores(tmp_path / "s", points, np.zeros(199))
    with pytest.raises(ValueError, match="NaN"):
        write_scores(tmp_path / "s", points, np.full(200, np.nan))
    assert list(tmp_path.iterdir()) == []


def test_write_scores_constant_scores(tmp_path, rng):
    npy_path, _ = write_scores(tmp_path / "flat", cloud(rng), np.ones(200))
    assert (np.load(npy_path) == 1).all()


# ------------------------------------------------------------------ real scans

REAL_PCDS = sorted((SCANS / "pcl").glob("*.pcd")) if SCANS.is_dir() else []
REAL_PLYS = sorted((SCANS / "stanford-bunny").glob("*.ply")) if SCANS.is_dir() else []


@needs_scans
def test_every_real_scan_reads():
    assert len(REAL_PCDS) >= 5 and len(REAL_PLYS) >= 7
    for path in REAL_PCDS + REAL_PLYS:
        scan = read_scan(path)
        assert len(scan.points) >= 397 and np.isfinite(scan.points).all(), path


@needs_scans
@pytest.mark.parametrize(
    "name",
    [
        "pcl/bunny.pcd",
        "pcl/bun0.pcd",
        "pcl/milk.pcd",
        "pcl/car6.pcd",
        "stanford-bunny/bun000.ply",
        "stanford-bunny/bun_zipper_res2.ply",
    ],
)
def test_real_scans_match_open3d(name):
    path = SCANS / name
    scan = read_scan(path)
    np.testing.assert_allclose(scan.points, o3d_points(path), rtol=0, atol=1e-7)
