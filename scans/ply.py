"""Stanford ``.ply`` files (ascii, binary little and big endian) read and written through plyfile.

plyfile gives the vertex element's extra properties (``label``, ``nx``..) as named arrays, steps over other
elements (faces, Cyberware ``range_grid``, lists of any length) and raises on a malformed header or a short
body. This module keeps the scan contract on top of it: the point limit, and short messages of our own
(``ValueError``, never quoting file content; ``scans.io`` adds the path).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from plyfile import PlyData, PlyElement, PlyElementParseError, PlyHeaderParseError, PlyListProperty


def _problem(error: PlyHeaderParseError | PlyElementParseError) -> str:
    """Our message for a plyfile error: its kind, line or element and row, never the file's own text."""
    text = str(error)
    if isinstance(error, PlyHeaderParseError):
        if "expected 'ply'" in text:
            return "not a PLY file (missing 'ply' magic line)"
        if "early end-of-file" in text:
            return "PLY header has no end_header line (file truncated or not a PLY file)"
        return f"PLY header is malformed at line {error.line} (an unknown keyword, format or property type)"
    name = getattr(error.element, "name", "?")
    if "early end-of-file" in text:
        count = getattr(error.element, "count", "?")
        return f"PLY is truncated: element '{name}' declares {count} items, the file ends at item {error.row}"
    return f"PLY element '{name}' item {error.row} holds a value that is not a number of its property's type"


def read_ply_vertices(path: Path, max_points: int, too_many: Callable[[int], str]) -> dict[str, np.ndarray]:
    """The vertex element's scalar properties as {name: (N,) array}; ``too_many(n)``: the message for n >
    max_points.

    The header is read first, so the count is checked before any body is parsed (bounded memory). Binary data
    is memory-mapped by plyfile. plyfile parses an ascii body row by row in Python when any element has list
    properties (faces, Cyberware ``range_grid``), dozens of times slower than numpy; so when the vertices
    come first and hold only scalars, their rows are read by numpy and the rest of the file is not read."""
    with open(path, "rb") as stream:
        try:
            header = PlyData._parse_header(stream)
        except PlyHeaderParseError as error:
            raise ValueError(_problem(error)) from None
        names = [element.name for element in header.elements]
        if "vertex" not in names:
            raise ValueError("PLY file has no vertex element")
        vertex = header["vertex"]
        if vertex.count > max_points:
            raise ValueError(too_many(vertex.count))
        scalars = [p.name for p in vertex.properties if not isinstance(p, PlyListProperty)]
        if header.text and names[0] == "vertex" and len(scalars) == len(vertex.properties):
            return _ascii_vertices(stream, vertex)
    try:
        ply = PlyData.read(str(path))
    except (PlyHeaderParseError, PlyElementParseError) as error:
        raise ValueError(_problem(error)) from None
    data = ply["vertex"].data
    return {name: np.array(data[name], dtype=data.dtype[name].newbyteorder("=")) for name in scalars}


def _ascii_vertices(stream: BinaryIO, vertex: PlyElement) -> dict[str, np.ndarray]:
    """The ascii rows of a scalar-only vertex element that comes first, read by numpy from ``stream``
    (positioned just after the header); the same messages as plyfile's errors."""
    dtype = np.dtype([(p.name, p.dtype("=")) for p in vertex.properties])
    try:
        rows = np.loadtxt(stream, dtype=dtype, max_rows=vertex.count, ndmin=1, comments=None)
    except ValueError:
        raise ValueError(
            "PLY element 'vertex' holds a value that is not a number of its property's type"
            " (or a row with the wrong number of values)"
        ) from None
    if len(rows) < vertex.count:
        raise ValueError(
            f"PLY is truncated: element 'vertex' declares {vertex.count} items,"
            f" the file ends at item {len(rows)}"
        )
    return {name: np.ascontiguousarray(rows[name]) for name in dtype.names}


def write_ply_binary(out: BinaryIO, columns: list[tuple[str, np.ndarray]]) -> None:
    """Equal-length 1-D columns as a binary little-endian PLY with one vertex element, into ``out``."""
    dtype = [(name, "<" + np.dtype(col.dtype).str[1:]) for name, col in columns]
    records = np.empty(len(columns[0][1]), dtype=dtype)
    for name, col in columns:
        records[name] = col
    PlyData([PlyElement.describe(records, "vertex")], text=False, byte_order="<").write(out)
