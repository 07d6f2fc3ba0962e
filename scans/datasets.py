"""Dataset loaders for the 3D anomaly benchmarks and a plain user folder layout; ``python -m evals.datasets``.

Why one small API for four layouts: the harness, the fitting CLI and notebooks only ask "which classes,
which train and test scans, which points are defective" and must never branch on a benchmark's folder quirks.
Listing is cheap (file names only); ``Sample.load`` reads the scan through ``tools.io.read_scan``, aligns the
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

import argparse
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from scans import strict_json
from scans.io import LABEL_SUFFIXES, Scan, ScanError, is_label_file, is_scan_file, read_scan

LAYOUTS = ("anomaly-shapenet", "real3d-ad", "mvtec3d", "folder")
DEFECT_TYPES = ("bulge", "concavity", "crack", "hole", "broken", "scratch", "other")
SPLITS = ("train", "validation", "test")
# GT xyz may be printed with fewer digits than the scan holds; this share of the bounding-box diagonal (plus a
# tiny absolute floor) absorbs that rounding; a real disagreement (other file, other pose) is far larger.
GT_RELATIVE_TOLERANCE = 1e-4
GT_ABSOLUTE_TOLERANCE = 1e-6

# How a sample's ground truth is stored; Sample.load dispatches on it.
GT_NONE = "none"                # no per-point truth (train scans, normal test scans of labelled layouts)
GT_TXT_COMMA = "txt-comma"      # Anomaly-ShapeNet: rows x,y,z,label
GT_TXT_SPACE = "txt-space"      # Real3D-AD: rows x y z label
GT_MASK_PNG = "mask-png"        # MVTec 3D-AD: H x W mask on the scan's pixel grid
GT_LABEL_FILE = "label-file"    # folder: one 0/1 per point, or x y z label rows (.txt or .npy)
GT_IN_SCAN = "in-scan"          # folder: labels column inside the scan file, if there is one


class DatasetError(ValueError):
    """A dataset spec, root or tree that cannot be used; the message names the path and the problem."""


class GroundTruthError(DatasetError):
    """Ground truth that is missing or does not describe the scan it belongs to (names both files)."""


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str


@dataclass(frozen=True)
class Sample:
    """One scan file with what its layout says about it; ``load`` reads it (listing never opens scans)."""

    path: Path
    cls: str
    split: str                          # "train" | "validation" | "test"
    label: int                          # 0 normal, 1 defective, -1 unknown (folder scans without label files)
    defect_type: str                    # "good", one of DEFECT_TYPES, MVTec's folder name, or "unknown"
    gt_path: Path | None = None         # where the per-point truth is (or must be, for defective samples)
    gt_format: str = GT_NONE
    remove_background: bool = False     # MVTec: drop the support plane from points and mask together
    seed: int = 0                       # seeds the background-plane RANSAC

    def load(self, **read_kwargs: Any) -> LoadedSample:
        """Read the scan (``read_kwargs`` go to ``tools.io.read_scan``) and its per-point mask.

        Raises ScanError for an unreadable scan and GroundTruthError for missing or mismatched ground truth.
        """
        scan = read_scan(self.path, **read_kwargs)
        mask = _load_mask(self, scan)
        points, keep = scan.points, None
        if self.remove_background:
            from scans.preprocess import remove_background_plane

            removal = remove_background_plane(scan.points, grid_shape=scan.grid_shape,
                                              grid_index=scan.grid_index, seed=self.seed)
            keep = np.flatnonzero(removal.keep)
            points = scan.points[keep]
            mask = None if mask is None else mask[keep]
        return LoadedSample(sample=self, points=points, mask=mask, scan=scan, kept_rows=keep)


@dataclass(frozen=True, eq=False)
class LoadedSample:
    sample: Sample
    points: np.ndarray                  # float32 (N, 3) after any preprocessing
    mask: np.ndarray | None             # bool (N,) True = anomalous point; None = no truth known
    scan: Scan                          # the scan as read (before background removal)
    kept_rows: np.ndarray | None = None  # int64 rows of scan.points that survived preprocessing (None = all)

    @property
    def object_label(self) -> int:
        """The sample's label, resolved from the mask when the listing could not know it (folder layout)."""
        if self.sample.label >= 0 or self.mask is None:
            return self.sample.label
        return int(bool(self.mask.any()))


# ---------------------------------------------------------------- ground truth

def _check_label_values(labels: np.ndarray, gt_path: Path) -> np.ndarray:
    if not np.isfinite(labels).all() or not np.isin(labels, (0, 1)).all():
        raise GroundTruthError(f"{gt_path}: labels must be 0 or 1")
    return labels > 0


def _read_gt_rows(gt_path: Path, delimiter: str | None, what: str) -> np.ndarray:
    """Read ``x y z label`` rows as float64 (M, 4); the delimiter is the layout's own (',' or whitespace)."""
    try:
        rows = np.loadtxt(gt_path, delimiter=delimiter, ndmin=2, dtype=np.float64)
    except (ValueError, OSError) as exc:
        kind = "unreadable" if isinstance(exc, OSError) else "not numeric"
        raise GroundTruthError(f"{gt_path}: {kind} ground truth; expected {what} rows") from None
    if rows.shape[1] != 4 or rows.shape[0] == 0:
        raise GroundTruthError(f"{gt_path}: expected {what} rows (4 columns), got shape {rows.shape}")
    return rows


def align_gt_rows(points: np.ndarray, gt_rows: np.ndarray, scan_path: Path, gt_path: Path,
                  dropped_nonfinite: int = 0) -> np.ndarray:
    """Per-point bool mask for ``points`` from GT rows ``x y z label`` that must be the same points.

    Row order is tried first; if it differs, every scan point and every GT row must have a partner within the
    tolerance (the Real3D-AD reference code reads points from the GT file, so we do not assume the order is
    identical to the scan file, only that the point sets are).
    """
    xyz, labels = gt_rows[:, :3], gt_rows[:, 3]
    finite = np.isfinite(xyz).all(axis=1)
    xyz, labels = xyz[finite], labels[finite]
    if len(xyz) != len(points):
        note = f" after dropping {dropped_nonfinite} non-finite scan rows" if dropped_nonfinite else ""
        raise GroundTruthError(f"{gt_path}: {len(xyz)} ground-truth rows but {scan_path} has {len(points)} "
                               f"points{note}")
    mask = _check_label_values(labels, gt_path)
    cloud = points.astype(np.float64)
    diagonal = float(np.linalg.norm(cloud.max(axis=0) - cloud.min(axis=0)))
    tolerance = GT_RELATIVE_TOLERANCE * diagonal + GT_ABSOLUTE_TOLERANCE
    if (np.abs(xyz - cloud).max(axis=1) <= tolerance).all():
        return mask
    from scipy.spatial import cKDTree  # exact 3-D nearest neighbour; a kd-tree beats brute force here

    dist_scan, nearest_gt = cKDTree(xyz).query(cloud, k=1)
    dist_gt, _ = cKDTree(cloud).query(xyz, k=1)
    far = int((dist_scan > tolerance).sum() + (dist_gt > tolerance).sum())
    if far:
        worst = float(max(dist_scan.max(), dist_gt.max()))
        raise GroundTruthError(f"{gt_path}: ground-truth points do not match {scan_path}: {far} points "
                               f"have no partner within {tolerance:.3g} (largest gap {worst:.3g})")
    return mask[nearest_gt]


def _load_png_mask(sample: Sample, scan: Scan) -> np.ndarray:
    from PIL import Image

    assert sample.gt_path is not None
    if scan.grid_shape is None or scan.grid_index is None:
        raise GroundTruthError(f"{sample.gt_path}: a pixel mask needs an organized scan, but {sample.path} "
                               "has no pixel grid")
    try:
        with Image.open(sample.gt_path) as image:
            pixels = np.asarray(image.convert("L"))
    except OSError:
        raise GroundTruthError(f"{sample.gt_path}: unreadable mask image") from None
    if pixels.shape != tuple(scan.grid_shape):
        raise GroundTruthError(f"{sample.gt_path}: mask is {pixels.shape[0]}x{pixels.shape[1]} pixels but "
                               f"{sample.path} is {scan.grid_shape[0]}x{scan.grid_shape[1]}")
    return pixels.reshape(-1)[scan.grid_index] > 0


def _read_label_file(gt_path: Path) -> np.ndarray:
    """Folder label file: (N,) labels or (N, 4) ``x y z label`` rows, as float64."""
    if gt_path.name.endswith(".npy"):
        try:
            array = np.load(gt_path, allow_pickle=False)
        except (ValueError, OSError):
            raise GroundTruthError(f"{gt_path}: not a readable numeric .npy array") from None
    else:
        try:
            text = gt_path.read_text(encoding="utf-8", errors="replace").replace(",", " ")
            array = np.loadtxt(text.splitlines(), ndmin=2, dtype=np.float64)
        except (ValueError, OSError):
            raise GroundTruthError(f"{gt_path}: not readable as numeric label rows") from None
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise GroundTruthError(f"{gt_path}: labels are not numeric (dtype {array.dtype})")
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if not (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 4)) or len(array) == 0:
        raise GroundTruthError(f"{gt_path}: expected one label per point or x y z label rows, got shape "
                               f"{array.shape}")
    return array


def _kept_rows(truth: np.ndarray, scan: Scan) -> np.ndarray:
    """Truth given per row of the scan file, reduced to the rows read_scan kept (it drops non-finite rows and
    isolated far outliers); truth of another length is returned as it is, for the checks that follow."""
    if scan.input_rows is not None and scan.grid_shape is None and len(truth) == scan.n_input_rows:
        return truth[scan.input_rows]
    return truth


def _load_mask(sample: Sample, scan: Scan) -> np.ndarray | None:
    """The per-point truth for ``scan`` following the sample's gt_format, or None when none is known."""
    fmt, gt_path = sample.gt_format, sample.gt_path
    if fmt == GT_IN_SCAN:
        return None if scan.labels is None else scan.labels > 0
    if gt_path is None or fmt == GT_NONE:
        if sample.label == 1:
            raise GroundTruthError(f"{sample.path}: defective sample has no ground-truth file")
        return np.zeros(len(scan.points), dtype=bool) if sample.label == 0 else None
    if not gt_path.is_file():
        if sample.label == 0:  # e.g. an MVTec good test scan without its all-zero mask
            return np.zeros(len(scan.points), dtype=bool)
        raise GroundTruthError(f"{gt_path}: ground-truth file for {sample.path} is missing")
    if fmt == GT_MASK_PNG:
        return _load_png_mask(sample, scan)
    if fmt in (GT_TXT_COMMA, GT_TXT_SPACE):
        delimiter, what = (",", "comma-delimited x,y,z,label") if fmt == GT_TXT_COMMA else \
            (None, "space-delimited x y z label")
        rows = _kept_rows(_read_gt_rows(gt_path, delimiter, what), scan)
        return align_gt_rows(scan.points, rows, sample.path, gt_path, scan.dropped_nonfinite)
    if fmt == GT_LABEL_FILE:
        array = _kept_rows(_read_label_file(gt_path), scan)
        if array.ndim == 2:
            return align_gt_rows(scan.points, array, sample.path, gt_path, scan.dropped_nonfinite)
        if len(array) != len(scan.points):
            dropped = scan.dropped_nonfinite
            note = f" ({dropped} non-finite rows were dropped)" if dropped else ""
            raise GroundTruthError(f"{gt_path}: {len(array)} labels but {sample.path} has {len(scan.points)} "
                                   f"points{note}")
        return _check_label_values(array, gt_path)
    raise DatasetError(f"{sample.path}: unknown ground-truth format {fmt!r}")


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
    return sorted((p for p in directory.glob(pattern) if p.is_file() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _subdirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


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
            raise DatasetError(f"{self.root}: no class {cls!r} in this {self.layout} tree; classes: "
                               f"{', '.join(sorted(roots)) or '(none)'}")
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

    def check(self, cls: str, **read_kwargs: Any) -> list[Problem]:
        """Every problem of a class: structure first, then each sample loaded once (scan + ground truth)."""
        return summarize_class(self, cls, **read_kwargs).problems


class _TemplateLayout(Dataset):
    """Anomaly-ShapeNet and Real3D-AD: train/*template*.pcd, test/*.pcd, a per-class folder of GT texts."""

    normal_marker: ClassVar[str] = ""
    gt_dirname: ClassVar[str] = ""
    gt_format: ClassVar[str] = GT_NONE

    def _classes_parent(self) -> Path:
        return self.root

    def _class_roots(self) -> dict[str, Path]:
        return {d.name: d for d in _subdirs(self._classes_parent())
                if (d / "train").is_dir() or (d / "test").is_dir()}

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
            raise DatasetError(f"{self.root}: no pcd/ folder; an anomaly-shapenet root holds "
                               "pcd/<class>/{train,test,GT}")

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
        return [Sample(p, cls, split, 0, "good", remove_background=self.remove_background, seed=self.seed)
                for p in self._tiffs(directory)]

    def train(self, cls: str) -> list[Sample]:
        return self._normal(cls, "train")

    def validation(self, cls: str) -> list[Sample]:
        return self._normal(cls, "validation")

    def test(self, cls: str) -> list[Sample]:
        samples = []
        for defect_dir in _subdirs(self.class_dir(cls) / "test"):
            label = 0 if defect_dir.name == "good" else 1
            for path in self._tiffs(defect_dir):
                samples.append(Sample(path, cls, "test", label, defect_dir.name,
                                      defect_dir / "gt" / f"{path.stem}.png", GT_MASK_PNG,
                                      remove_background=self.remove_background, seed=self.seed))
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
            raise DatasetError(f"{self.root}: no train/ or test/ folder, neither directly nor in class "
                               "subfolders; a folder root holds train/ and test/ "
                               "(or <class>/train, <class>/test)")

    def _class_roots(self) -> dict[str, Path]:
        if (self.root / "train").is_dir() or (self.root / "test").is_dir():
            return {self.root.resolve().name or "default": self.root}
        return {d.name: d for d in _subdirs(self.root) if (d / "train").is_dir() or (d / "test").is_dir()}

    def train(self, cls: str) -> list[Sample]:
        return [Sample(p, cls, "train", 0, "good")
                for p in _files(self.class_dir(cls) / "train") if is_scan_file(p)]

    def test(self, cls: str) -> list[Sample]:
        directory = self.class_dir(cls) / "test"
        samples = []
        for path in _files(directory):
            if not is_scan_file(path):
                continue
            label_file = next((directory / f"{path.stem}{s}" for s in LABEL_SUFFIXES
                               if (directory / f"{path.stem}{s}").is_file()), None)
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
                stem = label_file.name[: -len(next(s for s in LABEL_SUFFIXES
                                                   if label_file.name.lower().endswith(s)))]
                if stem not in scans:
                    problems.append(Problem(label_file, f"label file has no scan named {stem}.*"))
        return problems


def _peek_label(label_file: Path) -> int:
    """Object label of a folder label file (1 if any point is anomalous); -1 if unreadable (load says why)."""
    try:
        array = _read_label_file(label_file)
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
        raise DatasetError(f"dataset spec {spec!r} must look like <layout>:<root>; "
                           f"layouts: {', '.join(LAYOUTS)}")
    if layout not in _DATASETS:
        raise DatasetError(f"unknown dataset layout {layout!r} in {spec!r}; "
                           f"valid layouts: {', '.join(LAYOUTS)}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset root does not exist or is not a folder (layout {layout}; "
                           f"valid layouts: {', '.join(LAYOUTS)})")
    dataset_type = _DATASETS[layout]
    unknown = sorted(set(options) - set(dataset_type.options))
    if unknown:
        raise DatasetError(f"layout {layout} does not take option(s) {', '.join(unknown)}; it takes: "
                           f"{', '.join(dataset_type.options) or 'none'}")
    return dataset_type(path, **options)


# ---------------------------------------------------------------- summary (what the CLI prints)

@dataclass
class ClassSummary:
    cls: str
    n_train: int = 0
    n_validation: int = 0
    n_test: int = 0
    n_defective: int = 0
    n_unknown: int = 0
    points_per_sample: list[int] = field(default_factory=list)
    anomalous_shares: list[float] = field(default_factory=list)   # one per loaded defective test sample
    problems: list[Problem] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        counts = np.asarray(self.points_per_sample)
        points = ({"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}
                  if len(counts) else None)
        share = float(np.mean(self.anomalous_shares)) if self.anomalous_shares else None
        return {"class": self.cls, "train": self.n_train, "validation": self.n_validation,
                "test": self.n_test, "defective": self.n_defective, "unknown_label": self.n_unknown,
                "points": points, "anomalous_share_mean": share, "problems": len(self.problems)}


def summarize_class(dataset: Dataset, cls: str, **read_kwargs: Any) -> ClassSummary:
    """Load every sample of a class once; collect counts, point statistics and per-file problems (never raise
    for a broken file, so one bad scan does not hide the state of the rest of the tree)."""
    summary = ClassSummary(cls, problems=dataset.structure_problems(cls))
    train, validation, test = dataset.train(cls), dataset.validation(cls), dataset.test(cls)
    summary.n_train, summary.n_validation, summary.n_test = len(train), len(validation), len(test)
    for sample in train + validation + test:
        try:
            loaded = sample.load(**read_kwargs)
        except (ScanError, DatasetError) as exc:
            summary.problems.append(Problem(sample.path, str(exc)))
            label = sample.label
        else:
            summary.points_per_sample.append(len(loaded.points))
            label = loaded.object_label
            if sample.split == "test" and sample.label == 1 and loaded.mask is not None:
                if not loaded.mask.any():
                    summary.problems.append(Problem(
                        sample.path, "defective sample but its ground truth marks no anomalous point"))
                summary.anomalous_shares.append(float(loaded.mask.mean()) if len(loaded.mask) else 0.0)
            elif sample.split == "test" and label == 1 and loaded.mask is not None:  # resolved on load
                summary.anomalous_shares.append(float(loaded.mask.mean()))
        if sample.split == "test":
            summary.n_defective += int(label == 1)
            summary.n_unknown += int(label == -1)
    return summary


def summarize(dataset: Dataset, classes: Sequence[str] | None = None,
              **read_kwargs: Any) -> list[ClassSummary]:
    chosen = list(classes) if classes else dataset.classes()
    for cls in chosen:
        dataset.class_dir(cls)  # unknown class -> DatasetError before any loading
    return [summarize_class(dataset, cls, **read_kwargs) for cls in chosen]


def summary_document(spec: str, dataset: Dataset, summaries: Sequence[ClassSummary]) -> dict[str, Any]:
    return {
        "spec": spec, "layout": dataset.layout, "root": str(dataset.root),
        "classes": [s.as_dict() for s in summaries],
        "problems": [{"class": s.cls, "path": str(p.path), "message": p.message}
                     for s in summaries for p in s.problems],
    }


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write to a temp file next to ``path`` and rename, so a crash never leaves half a JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(strict_json.dumps(document, what=str(path), indent=2))
            out.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _format_share(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def render_table(document: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{document['layout']}: {document['root']}")
    # Short headers and folding (not truncating) cells keep every number visible in an 80-column terminal.
    for name in ("class", "train", "val", "test", "defect", "unk.", "points min/med/max", "anom.", "probl."):
        table.add_column(name, justify="left" if name == "class" else "right", overflow="fold")
    for row in document["classes"]:
        points = row["points"]
        median = points and (f"{points['median']:.0f}" if float(points["median"]).is_integer()
                             else f"{points['median']:.1f}")
        points_text = "-" if points is None else f"{points['min']} / {median} / {points['max']}"
        table.add_row(row["class"], str(row["train"]), str(row["validation"]), str(row["test"]),
                      str(row["defective"]), str(row["unknown_label"]), points_text,
                      _format_share(row["anomalous_share_mean"]), str(row["problems"]))
    return table


# ---------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    """Summarise a dataset tree; exit 0 clean, 1 problems found, 2 bad spec/root/class."""
    from rich.console import Console

    parser = argparse.ArgumentParser(
        prog="python -m evals.datasets", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  scanagent datasets anomaly-shapenet:dev-bench --classes flange,gear --json out.json\n"
               "  (`python -m evals.datasets ...` is the same command)\n\n"
               "exit codes: 0 clean, 1 problems found in the tree, 2 bad spec, root or class")
    parser.add_argument("spec", help=f"<layout>:<root>, layout one of {', '.join(LAYOUTS)}")
    parser.add_argument("--classes", help="comma-separated classes (default: all)")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--remove-background", action="store_true", help="mvtec3d: drop the support plane")
    args = parser.parse_args(argv)

    console, errors = Console(), Console(stderr=True)
    options = {"remove_background": True} if args.remove_background else {}
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        dataset = open_dataset(args.spec, **options)
        summaries = summarize(dataset, classes)
    except DatasetError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    document = summary_document(args.spec, dataset, summaries)
    console.print(render_table(document))
    for problem in document["problems"]:
        text = problem["message"]
        if not text.startswith(problem["path"]):
            text = f"{problem['path']}: {text}"
        console.print(f"problem [{problem['class']}] {text}", markup=False, highlight=False)
    if args.json:
        write_json_atomic(args.json, document)
    return 1 if document["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
