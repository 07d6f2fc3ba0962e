"""Dataset loaders for the 3D anomaly benchmarks and a plain user folder layout; ``python -m evals.datasets``.

Why one small API for four layouts: the harness, the fitting CLI and notebooks only ask "which classes,
which train and test scans, which points are defective" and must never branch on a benchmark's folder quirks.
Listing is cheap (file names only); ``Sample.load`` reads the scan through ``scans.io.read_scan``, aligns the
ground truth, and refuses ground truth that does not describe the scan's points instead of silently scoring
against wrong labels.

Layouts (see /work/shared/reference/benchmarks.md):
    anomaly-shapenet  <root>/pcd/<class>/{train/*template*.pcd, test/*.pcd, GT/<stem>.txt (x,y,z,label)}
    real3d-ad         <root>/<class>/{train/*template*.pcd, test/*.pcd, gt/<stem>.txt (x y z label)}
    mvtec3d           <root>/<class>/{train,validation}/good/xyz/*.tiff,
                      <root>/<class>/test/<defect|good>/{xyz/*.tiff, gt/*.png}
    folder            <root>[/<class>]/{train/*, test/*} with optional test/<stem>.labels.txt|.labels.npy
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from scans.ground_truth import (  # noqa: F401 -- DatasetError, GroundTruthError, align_gt_rows: part of this API
    GT_IN_SCAN,
    GT_LABEL_FILE,
    GT_MASK_PNG,
    GT_NONE,
    GT_TXT_COMMA,
    GT_TXT_SPACE,
    DatasetError,
    GroundTruthError,
    align_gt_rows,
    load_mask,
    read_label_file,
)
from scans.io import LABEL_SUFFIXES, Scan, is_label_file, is_scan_file, read_scan

LAYOUTS = ("anomaly-shapenet", "real3d-ad", "mvtec3d", "folder")
DEFECT_TYPES = ("bulge", "concavity", "crack", "hole", "broken", "scratch", "other")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str


@dataclass(frozen=True)
class Sample:
    """One scan file with what its layout says about it; ``load`` reads it (listing never opens scans)."""

    path: Path
    cls: str
    split: str  # "train" | "validation" | "test"
    label: int  # 0 normal, 1 defective, -1 unknown (folder scans without label files)
    defect_type: str  # "good", one of DEFECT_TYPES, MVTec's folder name, or "unknown"
    gt_path: Path | None = None  # where the per-point truth is (or must be, for defective samples)
    gt_format: str = GT_NONE
    remove_background: bool = False  # MVTec: drop the support plane from points and mask together
    seed: int = 0  # seeds the background-plane RANSAC

    def load(self, **read_kwargs: Any) -> LoadedSample:
        """Read the scan (``read_kwargs`` go to ``scans.io.read_scan``) and its per-point mask.

        Raises ScanError for an unreadable scan and GroundTruthError for missing or mismatched ground truth.
        """
        scan = read_scan(self.path, **read_kwargs)
        mask = load_mask(self, scan)
        points, keep = scan.points, None
        if self.remove_background:
            from scans.preprocess import remove_background_plane

            removal = remove_background_plane(
                scan.points, grid_shape=scan.grid_shape, grid_index=scan.grid_index, seed=self.seed
            )
            keep = np.flatnonzero(removal.keep)
            points = scan.points[keep]
            mask = None if mask is None else mask[keep]
        return LoadedSample(sample=self, points=points, mask=mask, scan=scan, kept_rows=keep)


@dataclass(frozen=True, eq=False)
class LoadedSample:
    sample: Sample
    points: np.ndarray  # float32 (N, 3) after any preprocessing
    mask: np.ndarray | None  # bool (N,) True = anomalous point; None = no truth known
    scan: Scan  # the scan as read (before background removal)
    kept_rows: np.ndarray | None = None  # int64 rows of scan.points that survived preprocessing (None = all)

    @property
    def object_label(self) -> int:
        """The sample's label, resolved from the mask when the listing could not know it (folder layout)."""
        if self.sample.label >= 0 or self.mask is None:
            return self.sample.label
        return int(bool(self.mask.any()))


# ---------------------------------------------------------------- listing helpers


def defect_type_from_name(stem: str, normal_marker: str) -> str:
    """'good' if the name has the layout's normal marker, else its first known defect word, else 'other'.

    Names look like ``ashtray0_bulge0`` or ``12_bulge_cut``: tokens split on '_', '-', '.' and spaces, with
    trailing digits removed, are compared with DEFECT_TYPES.
    """
    lowered = stem.lower()
    if normal_marker in lowered:
        return "good"
    for token in re.split(r"[_\-.\s]+", lowered):
        word = token.rstrip("0123456789")
        if word in DEFECT_TYPES:
            return word
    return "other"


def _files(directory: Path, pattern: str = "*") -> list[Path]:
    """Regular, non-hidden files matching ``pattern``, sorted by name (stable across machines)."""
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.glob(pattern) if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _subdirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )


# ---------------------------------------------------------------- datasets


class Dataset:
    """Base class: one layout on disk. Subclasses list samples; loading and checking are shared."""

    layout: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def _class_roots(self) -> dict[str, Path]:
        raise NotImplementedError

    def classes(self) -> list[str]:
        return sorted(self._class_roots())

    def class_dir(self, cls: str) -> Path:
        roots = self._class_roots()
        if cls not in roots:
            raise DatasetError(
                f"{self.root}: no class {cls!r} in this {self.layout} tree; classes: "
                f"{', '.join(sorted(roots)) or '(none)'}"
            )
        return roots[cls]

    def train(self, cls: str) -> list[Sample]:
        raise NotImplementedError

    def test(self, cls: str) -> list[Sample]:
        raise NotImplementedError

    def validation(self, cls: str) -> list[Sample]:
        self.class_dir(cls)
        return []

    def samples(self, cls: str) -> list[Sample]:
        return self.train(cls) + self.validation(cls) + self.test(cls)

    def structure_problems(self, cls: str) -> list[Problem]:
        """Problems visible from the file names alone (empty splits, orphaned ground truth)."""
        problems = []
        directory = self.class_dir(cls)
        if not self.train(cls):
            problems.append(Problem(directory, "no training scans found"))
        if not self.test(cls):
            problems.append(Problem(directory, "no test scans found"))
        return problems


class _TemplateLayout(Dataset):
    """Anomaly-ShapeNet and Real3D-AD: train/*template*.pcd, test/*.pcd, a per-class folder of GT texts."""

    normal_marker: ClassVar[str] = ""
    gt_dirname: ClassVar[str] = ""
    gt_format: ClassVar[str] = GT_NONE

    def _classes_parent(self) -> Path:
        return self.root

    def _class_roots(self) -> dict[str, Path]:
        return {
            d.name: d
            for d in _subdirs(self._classes_parent())
            if (d / "train").is_dir() or (d / "test").is_dir()
        }

    def train(self, cls: str) -> list[Sample]:
        directory = self.class_dir(cls) / "train"
        return [Sample(p, cls, "train", 0, "good") for p in _files(directory, "*template*.pcd")]

    def _test_files(self, cls: str) -> list[Path]:
        return _files(self.class_dir(cls) / "test", "*.pcd")

    def test(self, cls: str) -> list[Sample]:
        gt_dir = self.class_dir(cls) / self.gt_dirname
        samples = []
        for path in self._test_files(cls):
            defect = defect_type_from_name(path.stem, self.normal_marker)
            if defect == "good":
                samples.append(Sample(path, cls, "test", 0, "good"))
            else:
                gt_path = gt_dir / f"{path.stem}.txt"
                samples.append(Sample(path, cls, "test", 1, defect, gt_path, self.gt_format))
        return samples

    def structure_problems(self, cls: str) -> list[Problem]:
        problems = super().structure_problems(cls)
        test_stems = {p.stem for p in self._test_files(cls)}
        for gt_file in _files(self.class_dir(cls) / self.gt_dirname, "*.txt"):
            if gt_file.stem not in test_stems:
                problems.append(Problem(gt_file, f"ground-truth file has no test scan {gt_file.stem}.pcd"))
        return problems


class AnomalyShapeNet(_TemplateLayout):
    layout = "anomaly-shapenet"
    normal_marker = "positive"
    gt_dirname = "GT"
    gt_format = GT_TXT_COMMA

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        if not (self.root / "pcd").is_dir():
            raise DatasetError(
                f"{self.root}: no pcd/ folder; an anomaly-shapenet root holds pcd/<class>/{{train,test,GT}}"
            )

    def _classes_parent(self) -> Path:
        return self.root / "pcd"


class Real3DAD(_TemplateLayout):
    layout = "real3d-ad"
    normal_marker = "good"
    gt_dirname = "gt"
    gt_format = GT_TXT_SPACE

    def _test_files(self, cls: str) -> list[Path]:
        # Template copies sometimes sit in test/; the reference loader skips them too.
        return [p for p in super()._test_files(cls) if "template" not in p.name.lower()]


class MVTec3D(Dataset):
    layout = "mvtec3d"
    options = ("remove_background", "seed")

    def __init__(self, root: Path, *, remove_background: bool = False, seed: int = 0) -> None:
        super().__init__(root)
        self.remove_background = bool(remove_background)
        self.seed = int(seed)

    def _class_roots(self) -> dict[str, Path]:
        return {d.name: d for d in _subdirs(self.root) if (d / "train").is_dir() or (d / "test").is_dir()}

    def _tiffs(self, directory: Path) -> list[Path]:
        return [p for p in _files(directory / "xyz") if p.suffix.lower() in (".tiff", ".tif")]

    def _normal(self, cls: str, split: str) -> list[Sample]:
        directory = self.class_dir(cls) / split / "good"
        return [
            Sample(p, cls, split, 0, "good", remove_background=self.remove_background, seed=self.seed)
            for p in self._tiffs(directory)
        ]

    def train(self, cls: str) -> list[Sample]:
        return self._normal(cls, "train")

    def validation(self, cls: str) -> list[Sample]:
        return self._normal(cls, "validation")

    def test(self, cls: str) -> list[Sample]:
        samples = []
        for defect_dir in _subdirs(self.class_dir(cls) / "test"):
            label = 0 if defect_dir.name == "good" else 1
            for path in self._tiffs(defect_dir):
                samples.append(
                    Sample(
                        path,
                        cls,
                        "test",
                        label,
                        defect_dir.name,
                        defect_dir / "gt" / f"{path.stem}.png",
                        GT_MASK_PNG,
                        remove_background=self.remove_background,
                        seed=self.seed,
                    )
                )
        return samples

    def structure_problems(self, cls: str) -> list[Problem]:
        problems = super().structure_problems(cls)
        for defect_dir in _subdirs(self.class_dir(cls) / "test"):
            stems = {p.stem for p in self._tiffs(defect_dir)}
            for mask in _files(defect_dir / "gt", "*.png"):
                if mask.stem not in stems:
                    problems.append(Problem(mask, f"mask has no scan xyz/{mask.stem}.tiff"))
        return problems


class FolderDataset(Dataset):
    """``<root>/{train,test}`` (one class named after the root) or ``<root>/<class>/{train,test}``."""

    layout = "folder"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        if not self._class_roots():
            raise DatasetError(
                f"{self.root}: no train/ or test/ folder, neither directly nor in class "
                "subfolders; a folder root holds train/ and test/ "
                "(or <class>/train, <class>/test)"
            )

    def _class_roots(self) -> dict[str, Path]:
        if (self.root / "train").is_dir() or (self.root / "test").is_dir():
            return {self.root.resolve().name or "default": self.root}
        return {d.name: d for d in _subdirs(self.root) if (d / "train").is_dir() or (d / "test").is_dir()}

    def train(self, cls: str) -> list[Sample]:
        return [
            Sample(p, cls, "train", 0, "good")
            for p in _files(self.class_dir(cls) / "train")
            if is_scan_file(p)
        ]

    def test(self, cls: str) -> list[Sample]:
        directory = self.class_dir(cls) / "test"
        samples = []
        for path in _files(directory):
            if not is_scan_file(path):
                continue
            label_file = next(
                (
                    directory / f"{path.stem}{s}"
                    for s in LABEL_SUFFIXES
                    if (directory / f"{path.stem}{s}").is_file()
                ),
                None,
            )
            if label_file is None:  # labels may sit inside the scan; known only once it is read
                samples.append(Sample(path, cls, "test", -1, "unknown", None, GT_IN_SCAN))
                continue
            label = _peek_label(label_file)
            defect = {0: "good", 1: "other"}.get(label, "unknown")
            samples.append(Sample(path, cls, "test", label, defect, label_file, GT_LABEL_FILE))
        return samples

    def structure_problems(self, cls: str) -> list[Problem]:
        problems = super().structure_problems(cls)
        directory = self.class_dir(cls) / "test"
        scans = {p.stem for p in _files(directory) if is_scan_file(p)}
        for label_file in _files(directory):
            if is_label_file(label_file):
                stem = label_file.name[
                    : -len(next(s for s in LABEL_SUFFIXES if label_file.name.lower().endswith(s)))
                ]
                if stem not in scans:
                    problems.append(Problem(label_file, f"label file has no scan named {stem}.*"))
        return problems


def _peek_label(label_file: Path) -> int:
    """Object label of a folder label file (1 if any point is anomalous); -1 if unreadable (load says why)."""
    try:
        array = read_label_file(label_file)
    except GroundTruthError:
        return -1
    labels = array if array.ndim == 1 else array[:, 3]
    return int(bool((labels > 0).any()))


_DATASETS: dict[str, type[Dataset]] = {
    cls.layout: cls for cls in (AnomalyShapeNet, Real3DAD, MVTec3D, FolderDataset)
}


def open_dataset(spec: str, **options: Any) -> Dataset:
    """Open ``"<layout>:<root>"``; DatasetError for an unknown layout, a missing root or unknown options."""
    layout, sep, root = spec.partition(":")
    layout = layout.strip().lower()
    if not sep or not root:
        raise DatasetError(
            f"dataset spec {spec!r} must look like <layout>:<root>; layouts: {', '.join(LAYOUTS)}"
        )
    if layout not in _DATASETS:
        raise DatasetError(
            f"unknown dataset layout {layout!r} in {spec!r}; valid layouts: {', '.join(LAYOUTS)}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"{path}: dataset root does not exist or is not a folder (layout {layout}; "
            f"valid layouts: {', '.join(LAYOUTS)})"
        )
    dataset_type = _DATASETS[layout]
    unknown = sorted(set(options) - set(dataset_type.options))
    if unknown:
        raise DatasetError(
            f"layout {layout} does not take option(s) {', '.join(unknown)}; it takes: "
            f"{', '.join(dataset_type.options) or 'none'}"
        )
    return dataset_type(path, **options)
