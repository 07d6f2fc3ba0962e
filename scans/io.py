"""Scan I/O and validation: every scan enters the system through ``read_scan`` and leaves through the writers.

Why one gate: the detector, the verbaliser and the agent all assume finite float32 points with a real
extent, so bad input is rejected here with a message naming the file and the problem, instead of failing
deep inside. File header text and comments are never kept (``Scan.source`` is only the path) and never
quoted in errors, because anything read from a scan could end up in an LLM prompt.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scans.files import atomic_save_npy, atomic_write, atomic_write_bytes, umask_mode  # noqa: F401 -- umask_mode: API
from scans.outliers import FAR_FACTOR, find_far_outliers
from scans.pcd import read_pcd
from scans.ply import read_ply_vertices, write_ply_binary

MIN_POINTS = 64  # what the detector needs at least
DEFAULT_MAX_POINTS = 50_000_000
_CHECK_ROWS = 1_000_000  # rows per block when checking coordinates (bounded temporary memory)
TEXT_EXTENSIONS = (".xyz", ".txt", ".pts")
MESH_EXTENSIONS = (".obj", ".stl", ".off")
SUPPORTED_EXTENSIONS = (".ply", ".pcd", *TEXT_EXTENSIONS, ".npy", ".npz", *MESH_EXTENSIONS, ".tiff", ".tif")
# Per-point truth files that sit beside scans in the folder layout (and the demo): never scans themselves.
LABEL_SUFFIXES = (".labels.txt", ".labels.npy")


def is_label_file(path: Path) -> bool:
    """A per-point label file (`<stem>.labels.txt|npy`), which shares an extension with scans."""
    return Path(path).name.lower().endswith(LABEL_SUFFIXES)


def is_scan_file(path: Path) -> bool:
    """A file `read_scan` reads that is not a label file: what a folder of scans is made of."""
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS and not is_label_file(path)


# Text column layouts: 3 = xyz, 4 = xyz label, 6 = xyz normals, 7 = xyz normals label.
_TEXT_LAYOUTS = (3, 4, 6, 7)


class ScanError(ValueError):
    """Bad scan input; the message always starts with the file path: ``"<path>: <problem>"``."""

    def __init__(self, source: str | os.PathLike, problem: str | None = None) -> None:
        # ScanError(path, problem) is the usual form; ScanError("<path>: <problem>") is accepted as well.
        if problem is None:
            text = str(source)
            source, _, problem = text.partition(": ")
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields element-wise has no single truth value
class Scan:
    points: np.ndarray                      # float32 (N, 3), finite, validated
    normals: np.ndarray | None              # float32 (N, 3) or None
    labels: np.ndarray | None               # uint8 (N,) per-point labels read from the file, or None
    source: str                             # path as given (never header text / comments)
    grid_shape: tuple[int, int] | None      # (H, W) for organized inputs (MVTec tiffs, organized PCDs)
    grid_index: np.ndarray | None           # int64 (N,) flat index into H*W of each kept point (organized)
    dropped_nonfinite: int                  # rows dropped because of NaN/inf (or zeros on organized grids)
    dropped_outliers: int = 0               # isolated far points dropped (scans.outliers)
    input_rows: np.ndarray | None = None    # int64 (N,) file row of each kept point (None: all rows kept)
    n_input_rows: int | None = None         # rows the file held (organized grids: H*W); None: len(points)

    def to_input_rows(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """float32 (n_input_rows,) with ``values`` (one per kept point) at their file rows and ``fill``
        where a row was dropped: per-point outputs in the file's own row order."""
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if len(values) != len(self.points):
            raise ValueError(f"{self.source}: {len(values)} values for {len(self.points)} points")
        if self.input_rows is None or self.n_input_rows is None:
            return values
        out = np.full(self.n_input_rows, fill, dtype=np.float32)
        out[self.input_rows] = values
        return out


@dataclass
class _RawCloud:
    """What a format reader hands back before validation; all arrays have the file's row count."""

    points: np.ndarray
    normals: np.ndarray | None = None
    labels: np.ndarray | None = None
    grid_shape: tuple[int, int] | None = None
    valid: np.ndarray | None = None  # organized inputs: which grid cells hold a measurement


def _too_many(count: int, max_points: int) -> str:
    return f"has {count} points, more than the limit of {max_points} (max_points)"


def validate_points(points, source: str, *, min_points: int = MIN_POINTS,
                    max_bad_share: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Return (clean float32 (M, 3) points, boolean keep mask over the input rows) or raise ScanError.

    Rows with NaN/inf (or values beyond float32 range) are dropped with a warning stating the count; more than
    ``max_bad_share`` bad rows means the file is broken rather than noisy, so that raises.
    """
    try:
        array = np.asarray(points)
        if array.dtype.kind != "f" or array.dtype.itemsize > 8:  # float32/64 are checked as they are: no copy
            array = array.astype(np.float64)
    except (TypeError, ValueError):
        raise ScanError(source, "points are not numeric") from None
    if array.ndim != 2 or array.shape[1] != 3:
        raise ScanError(source, f"points must have shape (N, 3), got {array.shape}")
    total = array.shape[0]
    if total == 0:
        raise ScanError(source, "contains no points")
    float32_max = float(np.finfo(np.float32).max)
    keep = np.empty(total, dtype=bool)
    for start in range(0, total, _CHECK_ROWS):  # block by block: a huge scan gets no full-size temporaries
        block = array[start:start + _CHECK_ROWS]
        with np.errstate(invalid="ignore"):
            keep[start:start + len(block)] = (np.isfinite(block) & (np.abs(block) <= float32_max)).all(axis=1)
    bad = int(total - keep.sum())
    if bad > max_bad_share * total:
        raise ScanError(source, f"{bad} of {total} rows are NaN/inf, more than the allowed share "
                                f"{max_bad_share:g}")
    if bad:
        warnings.warn(f"{source}: dropped {bad} of {total} rows with NaN/inf coordinates", stacklevel=2)
    clean = (array[keep] if bad else array).astype(np.float32, copy=False)
    if clean.shape[0] < min_points:
        raise ScanError(source, f"has {clean.shape[0]} valid points, fewer than the minimum of {min_points}")
    high, low = clean.max(axis=0).astype(np.float64), clean.min(axis=0).astype(np.float64)
    diagonal = float(np.linalg.norm(high - low))
    scale = max(float(np.abs(high).max()), float(np.abs(low).max()), 1e-30)
    # float32 resolves ~1e-7 of the coordinate magnitude; an extent below that is no shape at all.
    if diagonal <= max(1e-6 * scale, 1e-12):
        raise ScanError(source, f"is degenerate: all points are (nearly) identical "
                                f"(bounding-box diagonal {diagonal:.3g})")
    return clean, keep


# ---------------------------------------------------------------- format readers (path, data, options)

def _column_stack(fields: dict[str, np.ndarray], names: tuple[str, str, str]) -> np.ndarray | None:
    if all(n in fields for n in names):
        return np.stack([np.asarray(fields[n], dtype=np.float64).reshape(-1) for n in names], axis=1)
    return None


def _read_pcd(path: Path, max_points: int, **_: object) -> _RawCloud:
    pcd = read_pcd(path, max_points, lambda n: _too_many(n, max_points))
    fields = pcd.fields
    points = _column_stack(fields, ("x", "y", "z"))
    if points is None:
        raise ValueError("PCD file has no x y z fields")
    raw = _RawCloud(points, _column_stack(fields, ("normal_x", "normal_y", "normal_z")), fields.get("label"))
    if pcd.height > 1:  # organized cloud (PCL marks missing pixels with NaN)
        raw.grid_shape = (pcd.height, pcd.width)
        raw.valid = np.isfinite(points).all(axis=1)
    return raw


def _read_ply(path: Path, max_points: int, **_: object) -> _RawCloud:
    fields = read_ply_vertices(path, max_points, lambda n: _too_many(n, max_points))
    points = _column_stack(fields, ("x", "y", "z"))
    if points is None:
        raise ValueError("PLY vertex element has no x y z properties")
    return _RawCloud(points, _column_stack(fields, ("nx", "ny", "nz")), fields.get("label"))


def _read_text(path: Path, **_: object) -> _RawCloud:
    text = path.read_bytes().decode("utf-8", errors="replace")
    rows = [ln.replace(",", " ") for ln in text.splitlines()]
    rows = [ln for ln in rows if ln.strip() and not ln.lstrip().startswith("#")]
    if not rows:
        raise ValueError("contains no points")
    widths = np.array([len(ln.split()) for ln in rows])
    width = int(widths[0])
    if width not in _TEXT_LAYOUTS or (widths != width).any():
        row = int(np.argmax(widths != width)) + 1 if (widths != width).any() else 1
        raise ValueError(f"text rows must all have 3 (x y z), 4 (x y z label), 6 (x y z nx ny nz) or "
                         f"7 (x y z nx ny nz label) columns; data row {row} does not")
    try:
        table = np.array(" ".join(rows).split(), dtype=np.float64).reshape(len(rows), width)
    except ValueError:
        raise ValueError("text data contains a value that is not a number") from None
    normals = table[:, 3:6] if width >= 6 else None
    labels = table[:, -1] if width in (4, 7) else None
    return _RawCloud(table[:, :3], normals, labels)


def _as_rows(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 2 or array.shape[1] < 3:
        raise ValueError(f"{what} must have shape (N, 3) or (N, >=3), got {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{what} is not numeric (dtype {array.dtype})")
    if array.dtype in (np.float32, np.float64) and array.shape[1] == 3:
        return array  # validate_points checks float32/64 in place: a huge scan is not copied
    return array[:, :3].astype(np.float64)


def _read_numpy(path: Path, **_: object) -> _RawCloud:
    if path.suffix.lower() == ".npy":
        return _RawCloud(_as_rows(np.load(path, allow_pickle=False), "array"))
    with np.load(path, allow_pickle=False) as archive:
        if not archive.files:
            raise ValueError("npz archive holds no arrays")
        key = "points" if "points" in archive.files else archive.files[0]
        points = _as_rows(archive[key], f"array '{key}'")
        normals = _as_rows(archive["normals"], "array 'normals'") if "normals" in archive.files else None
        labels = np.asarray(archive["labels"]).reshape(-1) if "labels" in archive.files else None
    for name, extra in (("normals", normals), ("labels", labels)):
        if extra is not None and len(extra) != len(points):
            raise ValueError(f"npz '{name}' has {len(extra)} rows, points have {len(points)}")
    return _RawCloud(points, normals, labels)


def _read_mesh(path: Path, mesh_points: int, max_points: int, seed: int, **_: object) -> _RawCloud:
    import trimesh  # heavy import, only needed for meshes

    if mesh_points > max_points:
        raise ValueError(_too_many(mesh_points, max_points))
    mesh = trimesh.load(str(path), force="mesh", process=False)
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError("mesh has no faces to sample")
    if not np.isfinite(mesh.vertices).all():
        raise ValueError("mesh has NaN/inf vertices")
    if mesh.area <= 0:
        raise ValueError("mesh has zero surface area (degenerate faces)")
    # Area-weighted surface sampling seeded for reproducibility; normals are the sampled faces' normals.
    points, face_index = trimesh.sample.sample_surface(mesh, int(mesh_points), seed=seed)
    return _RawCloud(np.asarray(points, dtype=np.float64), np.asarray(mesh.face_normals[face_index]))


def _read_tiff(path: Path, **_: object) -> _RawCloud:
    import tifffile

    image = np.asarray(tifffile.imread(str(path)))
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[2] != 3:  # planar (separate-sample) storage
        image = np.moveaxis(image, 0, -1)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"organized tiff must be H x W x 3 (x, y, z per pixel), got shape {image.shape}")
    height, width = image.shape[:2]
    points = image.reshape(-1, 3).astype(np.float64)
    # MVTec 3D-AD marks pixels without a measurement as (0, 0, 0); NaN is treated the same way.
    valid = np.isfinite(points).all(axis=1) & (points != 0).any(axis=1)
    return _RawCloud(points, grid_shape=(height, width), valid=valid)


_READERS: dict[str, Callable[..., _RawCloud]] = {
    ".pcd": _read_pcd, ".ply": _read_ply, ".npy": _read_numpy, ".npz": _read_numpy, ".tiff": _read_tiff,
    ".tif": _read_tiff, **{ext: _read_text for ext in TEXT_EXTENSIONS},
    **{ext: _read_mesh for ext in MESH_EXTENSIONS},
}


def _labels_uint8(labels: np.ndarray, source: str) -> np.ndarray:
    values = np.asarray(labels, dtype=np.float64)
    if not np.isfinite(values).all() or (values != np.round(values)).any() or values.min() < 0 \
            or values.max() > 255:
        raise ScanError(source, "labels must be whole numbers between 0 and 255")
    return values.astype(np.uint8)


def read_scan(path, *, mesh_points: int = 30000, min_points: int = MIN_POINTS,
              max_points: int = DEFAULT_MAX_POINTS, seed: int = 0, drop_outliers: bool = True) -> Scan:
    """Read and validate one scan file of any supported format; raise ScanError naming the file on bad input.

    Meshes are sampled to ``mesh_points`` surface points (deterministic by ``seed``); a PLY with faces gives
    its vertices. Organized inputs keep ``grid_shape``/``grid_index`` so image masks map to points. Isolated
    far points are dropped with a warning (``drop_outliers``, scans.outliers); ``input_rows`` keeps file rows.
    """
    source = str(path)
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in _READERS:
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        raise ScanError(source, f"unknown extension '{file.suffix}'; supported: {supported}")
    if not file.exists():
        raise ScanError(source, "file does not exist")
    if not file.is_file():
        raise ScanError(source, "is not a regular file")
    try:
        raw = _READERS[suffix](file, mesh_points=mesh_points, max_points=max_points, seed=seed)
    except ScanError:
        raise
    except MemoryError:
        raise ScanError(source, "too large to load into memory") from None
    except (ValueError, OSError, EOFError, KeyError, IndexError, TypeError) as exc:
        # Library messages may quote file bytes; keep only our own short ValueError texts.
        ours = type(exc) is ValueError
        problem = str(exc) if ours else f"unreadable or corrupt file ({type(exc).__name__})"
        raise ScanError(source, problem) from None
    except Exception as exc:  # noqa: BLE001 -- third-party parsers (trimesh, tifffile) raise many types
        raise ScanError(source, f"unreadable or corrupt file ({type(exc).__name__})") from None

    if len(raw.points) > max_points:
        raise ScanError(source, _too_many(len(raw.points), max_points))
    dropped = 0
    rows = np.arange(len(raw.points))
    if raw.valid is not None:  # organized grid: empty pixels are expected, not a sign of a broken file
        dropped = int((~raw.valid).sum())
        rows = rows[raw.valid]
    points, keep = validate_points(raw.points if raw.valid is None else raw.points[rows], source,
                                   min_points=min_points)
    rows = rows[keep]
    dropped += int((~keep).sum())
    outliers = find_far_outliers(points, seed=seed) if drop_outliers else np.zeros(0, dtype=np.int64)
    if outliers.size:
        warnings.warn(f"{source}: dropped {outliers.size} isolated point(s) more than {FAR_FACTOR:g} x the "
                      "part's median radius from its median centre (stray returns)", stacklevel=2)
        inside = np.isin(np.arange(len(points)), outliers, invert=True)
        points, rows = points[inside], rows[inside]
        if len(points) < min_points:
            raise ScanError(source, f"has {len(points)} valid points after dropping {outliers.size} far "
                                    f"outliers, fewer than the minimum of {min_points}")

    normals = None
    if raw.normals is not None:
        normals = np.asarray(raw.normals, dtype=np.float64)[rows]
        if not np.isfinite(normals).all():
            warnings.warn(f"{source}: normals contain NaN/inf; normals ignored", stacklevel=2)
            normals = None
        else:
            normals = normals.astype(np.float32)
    labels = None
    if raw.labels is not None:
        all_labels = np.asarray(raw.labels)
        if all_labels.shape != (len(raw.points),):
            raise ScanError(source, f"labels must be one value per point, got shape {all_labels.shape}")
        labels = _labels_uint8(all_labels[rows], source)
    grid_index = rows.astype(np.int64) if raw.grid_shape is not None else None
    return Scan(points=points, normals=normals, labels=labels, source=source, grid_shape=raw.grid_shape,
                grid_index=grid_index, dropped_nonfinite=dropped, dropped_outliers=int(outliers.size),
                input_rows=None if len(rows) == len(raw.points) else rows.astype(np.int64),
                n_input_rows=len(raw.points))


# ---------------------------------------------------------------- writers

def _atomic_write(path: Path, payload: bytes) -> None:
    """Write to a temp file in the target folder, then rename: a failure never leaves a half-written file."""
    atomic_write_bytes(path, payload)


def _finite_points(points, what: str) -> np.ndarray:
    array = np.asarray(points)
    if array.dtype.kind != "f":  # float32 input stays float32: no copy of a huge scan
        array = array.astype(np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"{what}: points must have shape (N, 3), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: points contain NaN/inf")
    return array


def write_pcd(path, points, labels=None) -> Path:
    """Write an ascii PCD (x y z [label]) that read_scan and open3d both read; returns the path."""
    target = Path(path)
    array = _finite_points(points, str(target))
    lines = ["# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7"]
    fields, sizes, types = ["x", "y", "z"], ["4", "4", "4"], ["F", "F", "F"]
    label_values = None
    if labels is not None:
        label_values = np.asarray(labels).reshape(-1)
        if len(label_values) != len(array):
            raise ValueError(f"{target}: {len(label_values)} labels for {len(array)} points")
        label_values = _labels_uint8(label_values, str(target)).astype(np.uint32)
        fields.append("label"), sizes.append("4"), types.append("U")
    n = len(array)
    lines += [f"FIELDS {' '.join(fields)}", f"SIZE {' '.join(sizes)}", f"TYPE {' '.join(types)}",
              f"COUNT {' '.join('1' for _ in fields)}", f"WIDTH {n}", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0",
              f"POINTS {n}", "DATA ascii"]
    # %.9g round-trips float32 exactly; one format string for the whole array is ~3x faster than per-row
    # joins.
    values = array.astype(np.float32).astype(np.float64)
    if label_values is None:
        body = ("%.9g %.9g %.9g\n" * n) % tuple(values.ravel())
    else:
        table = np.concatenate([values, label_values[:, None].astype(np.float64)], axis=1)
        body = ("%.9g %.9g %.9g %d\n" * n) % tuple(table.ravel())
    _atomic_write(target, ("\n".join(lines) + "\n" + body).encode("ascii"))
    return target


def write_scores(path_stem, points, scores, *, input_scores=None) -> tuple[Path, Path]:
    """Write ``<stem>.npy`` (float32 scores, input order) and ``<stem>.ply`` (x y z, colour, float anomaly).

    The PLY opens in any viewer (CloudCompare, MeshLab) with heat colours; the npy is what code reads back.
    ``input_scores`` (one per row of the input file, NaN where a row was dropped: ``Scan.to_input_rows``) goes
    into the npy instead of ``scores``; the PLY holds the points that were scored. Both are written to temp
    files first and renamed only when both are complete.
    """
    stem = str(path_stem)
    array = _finite_points(points, stem)
    values = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(values) != len(array):
        raise ValueError(f"{stem}: {len(values)} scores for {len(array)} points")
    if not np.isfinite(values).all():
        raise ValueError(f"{stem}: scores contain NaN/inf")
    npy_values = values if input_scores is None else np.asarray(input_scores, dtype=np.float32).reshape(-1)
    from scans.colours import heat_levels, heat_table

    # 256-entry colour table indexed per point: a few bytes per point, whatever the scan's size
    low = float(values.min()) if len(values) else 0.0
    high = float(values.max()) if len(values) else 0.0
    rgb = heat_table()[heat_levels(values, low, high)]
    columns = [*((axis, array[:, i].astype(np.float32, copy=False)) for i, axis in enumerate("xyz")),
               ("red", rgb[:, 0]), ("green", rgb[:, 1]), ("blue", rgb[:, 2]), ("anomaly", values)]
    npy_path, ply_path = Path(stem + ".npy"), Path(stem + ".ply")
    atomic_save_npy(npy_path, npy_values)
    atomic_write(ply_path, lambda out: write_ply_binary(out, columns))
    return npy_path, ply_path
