"""Per-point ground truth of a dataset sample, read in each layout's format and checked against its scan.

Ground truth that does not describe the scan's points (other row count, other coordinates, another image size)
is
refused with both files named, instead of silently scoring against wrong labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scans.io import Scan

# GT xyz may be printed with fewer digits than the scan holds; this share of the bounding-box diagonal (plus a
# tiny absolute floor) absorbs that rounding; a real disagreement (other file, other pose) is far larger.
GT_RELATIVE_TOLERANCE = 1e-4
GT_ABSOLUTE_TOLERANCE = 1e-6

# How a sample's ground truth is stored; Sample.load dispatches on it.
GT_NONE = "none"  # no per-point truth (train scans, normal test scans of labelled layouts)
GT_TXT_COMMA = "txt-comma"  # Anomaly-ShapeNet: rows x,y,z,label
GT_TXT_SPACE = "txt-space"  # Real3D-AD: rows x y z label
GT_MASK_PNG = "mask-png"  # MVTec 3D-AD: H x W mask on the scan's pixel grid
GT_LABEL_FILE = "label-file"  # folder: one 0/1 per point, or x y z label rows (.txt or .npy)
GT_IN_SCAN = "in-scan"  # folder: labels column inside the scan file, if there is one


class DatasetError(ValueError):
    """A dataset spec, root or tree that cannot be used; the message names the path and the problem."""


class GroundTruthError(DatasetError):
    """Ground truth that is missing or does not describe the scan it belongs to (names both files)."""


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


def align_gt_rows(
    points: np.ndarray, gt_rows: np.ndarray, scan_path: Path, gt_path: Path, dropped_nonfinite: int = 0
) -> np.ndarray:
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
        raise GroundTruthError(
            f"{gt_path}: {len(xyz)} ground-truth rows but {scan_path} has {len(points)} points{note}"
        )
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
        raise GroundTruthError(
            f"{gt_path}: ground-truth points do not match {scan_path}: {far} points "
            f"have no partner within {tolerance:.3g} (largest gap {worst:.3g})"
        )
    return mask[nearest_gt]


def _load_png_mask(sample: Any, scan: Scan) -> np.ndarray:
    from PIL import Image

    assert sample.gt_path is not None
    if scan.grid_shape is None or scan.grid_index is None:
        raise GroundTruthError(
            f"{sample.gt_path}: a pixel mask needs an organized scan, but {sample.path} has no pixel grid"
        )
    try:
        with Image.open(sample.gt_path) as image:
            pixels = np.asarray(image.convert("L"))
    except OSError:
        raise GroundTruthError(f"{sample.gt_path}: unreadable mask image") from None
    if pixels.shape != tuple(scan.grid_shape):
        raise GroundTruthError(
            f"{sample.gt_path}: mask is {pixels.shape[0]}x{pixels.shape[1]} pixels but "
            f"{sample.path} is {scan.grid_shape[0]}x{scan.grid_shape[1]}"
        )
    return pixels.reshape(-1)[scan.grid_index] > 0


def read_label_file(gt_path: Path) -> np.ndarray:
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
        raise GroundTruthError(
            f"{gt_path}: expected one label per point or x y z label rows, got shape {array.shape}"
        )
    return array


def _kept_rows(truth: np.ndarray, scan: Scan) -> np.ndarray:
    """Truth given per row of the scan file, reduced to the rows read_scan kept (it drops non-finite rows and
    isolated far outliers); truth of another length is returned as it is, for the checks that follow."""
    if scan.input_rows is not None and scan.grid_shape is None and len(truth) == scan.n_input_rows:
        return truth[scan.input_rows]
    return truth


def load_mask(sample: Any, scan: Scan) -> np.ndarray | None:
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
        delimiter, what = (
            (",", "comma-delimited x,y,z,label")
            if fmt == GT_TXT_COMMA
            else (None, "space-delimited x y z label")
        )
        rows = _kept_rows(_read_gt_rows(gt_path, delimiter, what), scan)
        return align_gt_rows(scan.points, rows, sample.path, gt_path, scan.dropped_nonfinite)
    if fmt == GT_LABEL_FILE:
        array = _kept_rows(read_label_file(gt_path), scan)
        if array.ndim == 2:
            return align_gt_rows(scan.points, array, sample.path, gt_path, scan.dropped_nonfinite)
        if len(array) != len(scan.points):
            dropped = scan.dropped_nonfinite
            note = f" ({dropped} non-finite rows were dropped)" if dropped else ""
            raise GroundTruthError(
                f"{gt_path}: {len(array)} labels but {sample.path} has {len(scan.points)} points{note}"
            )
        return _check_label_values(array, gt_path)
    raise DatasetError(f"{sample.path}: unknown ground-truth format {fmt!r}")
