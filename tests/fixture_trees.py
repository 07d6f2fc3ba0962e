"""Write tiny dataset trees in exactly the real benchmark layouts, plus what a correct loader must find.

Why a manifest: tests compare the loaders against what was written here (labels, defect types, anomalous point
indices), never against the loaders' own earlier output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from scans.io import write_pcd


@dataclass(frozen=True, eq=False)
class Expected:
    name: str  # file name of the scan
    split: str  # "train" | "validation" | "test"
    label: int  # 0 / 1 / -1
    defect_type: str
    mask: np.ndarray | None  # bool per point in file order (after dropped invalid pixels); None = no truth


Manifest = dict[str, list[Expected]]  # class -> expected samples


def sphere_cloud(n_points: int, seed: int, radius: float = 1.0) -> np.ndarray:
    """Points spread over a sphere (distinct, finite, with a real extent)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_points, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return (radius * directions).astype(np.float32)


def defect_mask(points: np.ndarray, n_anomalous: int) -> np.ndarray:
    """The ``n_anomalous`` points nearest to point 0: a compact defect region."""
    distance = np.linalg.norm(points - points[0], axis=1)
    mask = np.zeros(len(points), dtype=bool)
    mask[np.argsort(distance, kind="stable")[:n_anomalous]] = True
    return mask


def _write_gt_txt(
    path: Path, points: np.ndarray, mask: np.ndarray, delimiter: str, order: np.ndarray | None = None
) -> None:
    rows = np.column_stack([points.astype(np.float64), mask.astype(np.float64)])
    if order is not None:
        rows = rows[order]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, rows, fmt=["%.6f", "%.6f", "%.6f", "%d"], delimiter=delimiter)


def write_anomaly_shapenet(
    root: Path, classes: tuple[str, ...] = ("bottle0", "ashtray0"), n_points: int = 300
) -> Manifest:
    """<root>/pcd/<class>/{train/*template*.pcd, test/*.pcd, GT/<stem>.txt comma rows}; also obj/<class>."""
    manifest: Manifest = {}
    for class_index, cls in enumerate(classes):
        base = Path(root) / "pcd" / cls
        expected = []
        for i in range(2):
            name = f"{cls}_template{i}.pcd"
            write_pcd(base / "train" / name, sphere_cloud(n_points, seed=100 * class_index + i))
            expected.append(Expected(name, "train", 0, "good", None))
        (base / "train" / "notes.txt").write_text("not a template\n")  # must be ignored
        name = f"{cls}_positive0.pcd"
        points = sphere_cloud(n_points + 20, seed=100 * class_index + 10)
        write_pcd(base / "test" / name, points)
        expected.append(Expected(name, "test", 0, "good", np.zeros(len(points), dtype=bool)))
        for j, defect in enumerate(("bulge", "hole")):
            name = f"{cls}_{defect}{j}.pcd"
            points = sphere_cloud(n_points + 40 * j, seed=100 * class_index + 20 + j)
            mask = defect_mask(points, 12 + 5 * j)
            write_pcd(base / "test" / name, points)
            _write_gt_txt(base / "GT" / f"{Path(name).stem}.txt", points, mask, delimiter=",")
            expected.append(Expected(name, "test", 1, defect, mask))
        (Path(root) / "obj" / cls).mkdir(parents=True, exist_ok=True)
        manifest[cls] = expected
    return manifest


def write_real3d_ad(
    root: Path, classes: tuple[str, ...] = ("seahorse", "airplane"), n_points: int = 260
) -> Manifest:
    """<root>/<class>/{train/*template*.pcd, test/*.pcd, gt/<stem>.txt space rows}.

    One defective sample's GT rows are written in shuffled order (the loader must align by position, not row);
    a template copy in test/ must be skipped.
    """
    manifest: Manifest = {}
    for class_index, cls in enumerate(classes):
        base = Path(root) / cls
        expected = []
        for i in range(3):
            name = f"{i}_template.pcd"
            write_pcd(base / "train" / name, sphere_cloud(n_points * 2, seed=500 + 10 * class_index + i))
            expected.append(Expected(name, "train", 0, "good", None))
        # a template copy, not a test sample
        write_pcd(base / "test" / "0_template.pcd", sphere_cloud(n_points, seed=1))
        points = sphere_cloud(n_points, seed=600 + class_index)
        write_pcd(base / "test" / "100_good.pcd", points)
        expected.append(Expected("100_good.pcd", "test", 0, "good", np.zeros(len(points), dtype=bool)))
        for j, stem in enumerate(("101_bulge", "102_sink_cut")):
            points = sphere_cloud(n_points + 30 * j, seed=700 + 10 * class_index + j)
            mask = defect_mask(points, 9 + 4 * j)
            write_pcd(base / "test" / f"{stem}.pcd", points)
            order = np.random.default_rng(j).permutation(len(points)) if j == 1 else None
            _write_gt_txt(base / "gt" / f"{stem}.txt", points, mask, delimiter=" ", order=order)
            expected.append(Expected(f"{stem}.pcd", "test", 1, "bulge" if j == 0 else "other", mask))
        manifest[cls] = expected
    return manifest


MVTEC_GRID = (16, 20)  # H, W
MVTEC_OBJECT = (slice(4, 12), slice(5, 15))  # rows, cols of the raised object in the middle of the frame


def mvtec_scene(
    seed: int, height: int = MVTEC_GRID[0], width: int = MVTEC_GRID[1]
) -> tuple[np.ndarray, np.ndarray]:
    """An organized H x W x 3 scan: a flat support (z ~ 0) with a raised box-shaped object; the first
    row and a few pixels are invalid (0, 0, 0) as in MVTec. Returns (image, object pixel mask)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    z = rng.normal(0.0, 1e-4, size=(height, width))
    on_object = np.zeros((height, width), dtype=bool)
    on_object[MVTEC_OBJECT] = True
    z[on_object] += 0.06 + 0.01 * rng.random(on_object.sum())
    image = np.stack([0.01 * cols, 0.01 * rows + 0.005, z + 0.4], axis=-1).astype(np.float32)
    image[0] = 0.0  # a whole invalid row
    image[5, 7] = image[10, 2] = 0.0  # scattered invalid pixels
    return image, on_object


def _valid_pixels(image: np.ndarray) -> np.ndarray:
    return (image != 0).any(axis=-1)


def write_mvtec3d(root: Path, classes: tuple[str, ...] = ("bagel", "tire")) -> Manifest:
    """<root>/<class>/{train,validation}/good/{rgb,xyz}, <class>/test/<defect|good>/{rgb, xyz, gt}."""
    manifest: Manifest = {}
    height, width = MVTEC_GRID
    for class_index, cls in enumerate(classes):
        base = Path(root) / cls
        expected = []

        def put(folder: Path, stem: str, seed: int, pixel_mask: np.ndarray | None) -> np.ndarray:
            image, _ = mvtec_scene(seed)
            for sub in ("xyz", "rgb") + (("gt",) if pixel_mask is not None else ()):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", image)
            Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(folder / "rgb" / f"{stem}.png")
            if pixel_mask is not None:
                png = Image.fromarray(pixel_mask.astype(np.uint8) * 255, mode="L")
                png.save(folder / "gt" / f"{stem}.png")
            valid = _valid_pixels(image)
            return np.zeros(int(valid.sum()), dtype=bool) if pixel_mask is None else pixel_mask[valid]

        seed = 1000 * (class_index + 1)
        for split, count in (("train", 2), ("validation", 1)):
            for i in range(count):
                put(base / split / "good", f"{i:03d}", seed := seed + 1, None)
                expected.append(Expected(f"{i:03d}.tiff", split, 0, "good", None))
        empty = np.zeros((height, width), dtype=bool)
        mask = put(base / "test" / "good", "000", seed := seed + 1, empty)
        expected.append(Expected("000.tiff", "test", 0, "good", mask))
        for i in range(2):
            pixels = np.zeros((height, width), dtype=bool)
            pixels[6:9, 8 + 2 * i : 11 + 2 * i] = True  # a defect on the object
            mask = put(base / "test" / "crack", f"{i:03d}", seed := seed + 1, pixels)
            expected.append(Expected(f"{i:03d}.tiff", "test", 1, "crack", mask))
        manifest[cls] = expected
    return manifest


def write_folder(root: Path, classes: tuple[str, ...] | None = None, n_points: int = 220) -> Manifest:
    """<root>/{train,test} (classes=None) or <root>/<class>/{train,test} with the label-file variants:

    n1.pcd + n1.labels.txt (one 0 per line) -> normal; d1.npy + d1.labels.npy (x y z label rows) -> defective;
    e1.txt (x y z label columns inside the scan) -> label unknown until loaded; u1.pcd -> unknown, no truth.
    """
    manifest: Manifest = {}
    for class_index, cls in enumerate(classes or (Path(root).resolve().name,)):
        base = Path(root) / cls if classes else Path(root)
        seed = 2000 + 100 * class_index
        expected = []
        write_pcd(base / "train" / "t0.pcd", sphere_cloud(n_points, seed))
        np.save(base / "train" / "t1.npy", sphere_cloud(n_points, seed + 1))
        expected += [
            Expected("t0.pcd", "train", 0, "good", None),
            Expected("t1.npy", "train", 0, "good", None),
        ]

        test = base / "test"
        points = sphere_cloud(n_points, seed + 2)
        write_pcd(test / "n1.pcd", points)
        np.savetxt(test / "n1.labels.txt", np.zeros(len(points)), fmt="%d")
        expected.append(Expected("n1.pcd", "test", 0, "good", np.zeros(len(points), dtype=bool)))

        points = sphere_cloud(n_points + 10, seed + 3)
        mask = defect_mask(points, 15)
        np.save(test / "d1.npy", points)
        np.save(test / "d1.labels.npy", np.column_stack([points, mask]).astype(np.float64))
        expected.append(Expected("d1.npy", "test", 1, "other", mask))

        points = sphere_cloud(n_points + 20, seed + 4)
        mask = defect_mask(points, 7)
        np.savetxt(test / "e1.txt", np.column_stack([points, mask]), fmt=["%.7f", "%.7f", "%.7f", "%d"])
        expected.append(Expected("e1.txt", "test", -1, "unknown", mask))

        write_pcd(test / "u1.pcd", sphere_cloud(n_points, seed + 5))
        expected.append(Expected("u1.pcd", "test", -1, "unknown", None))
        manifest[cls] = expected
    return manifest
