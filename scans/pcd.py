"""PCL's ``.pcd`` point clouds (ascii, binary, binary_compressed) read through pypcd4.

Why pypcd4 and not open3d's tensor reader: pypcd4 gives every field as a named array (``label``,
``normal_x``, fields with COUNT > 1), the WIDTH/HEIGHT of organized clouds, and raises on bad data. open3d
reads the same files but zero-fills a truncated ascii body, reads a non-number as a value, keeps one column
of a COUNT > 1 field, forgets WIDTH/HEIGHT and reports its failures only as warnings on stdout.

This module adds what the scan contract needs on top of the library: the point limit checked from the header
before the body is read, truncation and WIDTH x HEIGHT checked against POINTS, and short messages of our own
(``ValueError``, never quoting file content; ``scans.io`` prefixes the path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from pypcd4 import Encoding, MetaData, PointCloud

_V07 = (["0.7"], [".7"])  # how pypcd4 accepts VERSION
_HEADER_LINES = 10  # pypcd4 reads at most this many non-comment header lines; DATA is the last of them
_BAD_HEADER = (
    "PCD header is missing or malformed: it needs FIELDS, SIZE, TYPE, COUNT, WIDTH, HEIGHT, POINTS "
    "and DATA lines of matching lengths (not a PCD file?)"
)


@dataclass(frozen=True)
class PCDFile:
    """A PCD file's fields (padding fields dropped; a COUNT > 1 field as ``name__0000``...) and its grid."""

    fields: dict[str, np.ndarray]
    width: int
    height: int


def _header(path: Path) -> tuple[MetaData, int, bool]:
    """The header as pypcd4 parses it, the byte where the point data starts, and whether the file is of an
    older VERSION (.5, .6) than the 0.7 pypcd4 accepts: their ascii and binary bodies are laid out alike."""
    lines: list[str] = []
    with path.open("rb") as stream:
        for raw in stream:  # the same lines pypcd4 reads: comments skipped, up to the DATA line
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(_BAD_HEADER) from None
            if not line or line.startswith("#"):
                continue
            lines.append(line)
            if line.startswith("DATA") or len(lines) >= _HEADER_LINES:
                break
        offset = stream.tell()
    older = [
        i for i, line in enumerate(lines) if line.split()[0] == "VERSION" and line.split()[1:] not in _V07
    ]
    for i in older:
        lines[i] = "VERSION 0.7"
    try:
        meta = MetaData.parse_header(lines)
        meta.build_dtype()
    except Exception:  # noqa: BLE001 -- pydantic, IndexError, TypeError: all mean a header we cannot use
        raise ValueError(_BAD_HEADER) from None
    if meta.width * meta.height != meta.points:
        raise ValueError(
            f"PCD header WIDTH x HEIGHT ({meta.width} x {meta.height}) differs from POINTS ({meta.points})"
        )
    return meta, offset, bool(older)


def _records(path: Path, meta: MetaData, offset: int, older: bool) -> np.ndarray | None:
    """pypcd4's structured array of the body, None when the body does not decode."""
    try:
        if not older:
            return PointCloud.from_path(path).pc_data
        with path.open("rb") as stream:  # an older file: the same body behind a 0.7 header
            stream.seek(offset)
            return PointCloud.from_fileobj(BytesIO(meta.compose_header().encode() + stream.read())).pc_data
    except Exception:  # noqa: BLE001 -- numpy, lzf and struct errors of a body that does not decode
        return None


def read_pcd(path: Path, max_points: int, too_many: Callable[[int], str]) -> PCDFile:
    """Every field of a PCD file; ``too_many(n)`` is the message when the header declares n > max_points."""
    meta, offset, older = _header(path)
    if meta.points > max_points:
        raise ValueError(too_many(meta.points))
    dtype = meta.build_dtype()
    records = _records(path, meta, offset, older)
    if meta.data == Encoding.BINARY and (records is None or len(records) < meta.points):
        need, present = meta.points * dtype.itemsize, path.stat().st_size - offset
        raise ValueError(
            f"binary PCD is truncated: header declares {meta.points} points ({need} bytes) "
            f"but only {present} bytes follow"
        )
    if meta.data == Encoding.BINARY_COMPRESSED and (records is None or len(records) != meta.points):
        raise ValueError(
            "binary_compressed PCD is truncated or corrupt: its LZF data does not decompress to "
            f"the {meta.points} points the header declares"
        )
    if records is None:
        raise ValueError(
            "ascii PCD rows must each hold FIELDS x COUNT numbers (a value is missing or not a number)"
        )
    records = np.atleast_1d(records)
    if len(records) != meta.points:
        raise ValueError(
            f"ascii PCD has {len(records)} data lines, header declares {meta.points} points"
            + (" (file truncated)" if len(records) < meta.points else "")
        )
    fields = {
        name: np.ascontiguousarray(records[name])
        for name in records.dtype.names or ()
        if not name.startswith("#$%&~~")
    }  # pypcd4's name for a "_" padding field
    return PCDFile(fields, meta.width, meta.height)
