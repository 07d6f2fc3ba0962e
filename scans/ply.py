"""Parser and writer for the Stanford ``.ply`` format (ascii, binary_little_endian, binary_big_endian).

Written by hand because we need the vertex element's extra properties (``label``, ``nx``..) as arrays and
strict truncation checks; no installed library gives both (open3d drops unknown properties, trimesh rebuilds
meshes). Only the vertex element is returned; other elements (faces, Cyberware ``range_grid``) are parsed just
far enough to step over them and to notice truncation. Errors are ``ValueError`` without file content;
``tools.io`` adds the path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

_PLY_TYPES: dict[str, str] = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_FORMATS = {"ascii": "", "binary_little_endian": "<", "binary_big_endian": ">"}
_MAX_HEADER_BYTES = 1 << 20


@dataclass(frozen=True)
class PLYProperty:
    name: str
    dtype: str                      # numpy type code without byte order, e.g. "f4"
    list_count_dtype: str | None = None  # set for "property list <count type> <item type> name"


@dataclass
class PLYElement:
    name: str
    count: int
    properties: list[PLYProperty] = field(default_factory=list)

    @property
    def has_lists(self) -> bool:
        return any(p.list_count_dtype for p in self.properties)


@dataclass(frozen=True)
class PLYHeader:
    fmt: str                        # "ascii", "binary_little_endian" or "binary_big_endian"
    elements: tuple[PLYElement, ...]
    data_offset: int

    def element(self, name: str) -> PLYElement | None:
        return next((e for e in self.elements if e.name == name), None)


def parse_ply_header(data: bytes) -> PLYHeader:
    """Parse the header through ``end_header``; raise ValueError when malformed."""
    if not data.startswith(b"ply"):
        raise ValueError("not a PLY file (missing 'ply' magic line)")
    end = data.find(b"end_header", 0, _MAX_HEADER_BYTES)
    if end < 0:
        raise ValueError("PLY header has no end_header line (file truncated or not a PLY file)")
    newline = data.find(b"\n", end)
    offset = len(data) if newline < 0 else newline + 1
    try:
        lines = data[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError("PLY header contains non-text bytes") from None
    fmt: str | None = None
    elements: list[PLYElement] = []
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if len(words) < 2 or words[1] not in _FORMATS:
                raise ValueError(f"PLY format must be one of {', '.join(_FORMATS)}")
            fmt = words[1]
        elif words[0] == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise ValueError("PLY header has a malformed element line")
            elements.append(PLYElement(words[1], int(words[2])))
        elif words[0] == "property":
            if not elements:
                raise ValueError("PLY header has a property before any element")
            if len(words) == 5 and words[1] == "list":
                if words[2] not in _PLY_TYPES or words[3] not in _PLY_TYPES:
                    raise ValueError("PLY header has a list property of unknown type")
                prop = PLYProperty(words[4], _PLY_TYPES[words[3]], _PLY_TYPES[words[2]])
                elements[-1].properties.append(prop)
            elif len(words) == 3 and words[1] in _PLY_TYPES:
                elements[-1].properties.append(PLYProperty(words[2], _PLY_TYPES[words[1]]))
            else:
                raise ValueError("PLY header has a malformed or unknown-type property line")
        else:
            raise ValueError("PLY header has an unknown keyword")
    if fmt is None:
        raise ValueError("PLY header lacks the format line")
    return PLYHeader(fmt, tuple(elements), offset)


def _fixed_dtype(element: PLYElement, order: str, list_lengths: dict[str, int] | None = None) -> np.dtype:
    """Packed record dtype; list properties become (count, items[k]) with the given constant lengths."""
    entries: list[tuple] = []
    for prop in element.properties:
        if prop.list_count_dtype:
            k = (list_lengths or {})[prop.name]
            entries.append((f"{prop.name}__n", order + prop.list_count_dtype))
            entries.append((prop.name, order + prop.dtype, (k,)))
        else:
            entries.append((prop.name, order + prop.dtype))
    return np.dtype(entries)


def _binary_element(buf: memoryview, pos: int, element: PLYElement,
                    order: str) -> tuple[np.ndarray | None, int]:
    """Read one binary element starting at ``pos``; return (records or None for list elements, next pos)."""
    if not element.has_lists:
        dtype = _fixed_dtype(element, order)
        need = element.count * dtype.itemsize
        if len(buf) - pos < need:
            raise ValueError(f"binary PLY is truncated: element '{element.name}' needs {need} bytes "
                             f"({element.count} items), only {len(buf) - pos} follow")
        return np.frombuffer(buf, dtype=dtype, count=element.count, offset=pos), pos + need
    # Lists (faces, range grids): try constant list lengths (the usual case, one numpy read), else walk items.
    if element.count == 0:
        return None, pos
    lengths: dict[str, int] = {}
    probe = pos
    try:
        for prop in element.properties:
            ctype = np.dtype(order + (prop.list_count_dtype or prop.dtype))
            if prop.list_count_dtype:
                k = int(np.frombuffer(buf, dtype=ctype, count=1, offset=probe)[0])
                lengths[prop.name] = k
                probe += ctype.itemsize + k * np.dtype(prop.dtype).itemsize
            else:
                probe += ctype.itemsize
    except ValueError:
        raise ValueError(f"binary PLY is truncated inside element '{element.name}'") from None
    dtype = _fixed_dtype(element, order, lengths)
    need = element.count * dtype.itemsize
    if len(buf) - pos >= need:
        records = np.frombuffer(buf, dtype=dtype, count=element.count, offset=pos)
        if all((records[f"{name}__n"] == k).all() for name, k in lengths.items()):
            return None, pos + need
    for _ in range(element.count):  # variable-length lists: step item by item
        for prop in element.properties:
            ctype = np.dtype(order + (prop.list_count_dtype or prop.dtype))
            if len(buf) - pos < ctype.itemsize:
                raise ValueError(f"binary PLY is truncated inside element '{element.name}'")
            if prop.list_count_dtype:
                k = int(np.frombuffer(buf, dtype=ctype, count=1, offset=pos)[0])
                pos += ctype.itemsize + k * np.dtype(prop.dtype).itemsize
            else:
                pos += ctype.itemsize
    if pos > len(buf):
        raise ValueError(f"binary PLY is truncated inside element '{element.name}'")
    return None, pos


def read_ply_vertices(data: bytes, header: PLYHeader) -> dict[str, np.ndarray]:
    """Return the vertex element's scalar properties as {name: (N,) array}; other elements are skipped."""
    vertex = header.element("vertex")
    if vertex is None:
        raise ValueError("PLY file has no vertex element")
    buf = memoryview(data)
    if header.fmt != "ascii":
        order = _FORMATS[header.fmt]
        pos = header.data_offset
        result: dict[str, np.ndarray] = {}
        for element in header.elements:
            records, pos = _binary_element(buf, pos, element, order)
            if element is vertex and records is not None:
                result = {p.name: records[p.name].astype(records[p.name].dtype.newbyteorder("="))
                          for p in element.properties if not p.list_count_dtype}
        return result

    lines = bytes(buf[header.data_offset:]).decode("ascii", errors="replace").splitlines()
    lines = [ln for ln in lines if ln.strip()]
    start = 0
    result = {}
    for element in header.elements:
        chunk = lines[start:start + element.count]
        if len(chunk) < element.count:
            raise ValueError(f"ascii PLY is truncated: element '{element.name}' declares {element.count} "
                             f"lines, {len(chunk)} present")
        start += element.count
        if element is not vertex:
            continue
        if vertex.has_lists:
            raise ValueError("PLY vertex element with list properties is not supported")
        width = len(vertex.properties)
        tokens = " ".join(chunk).split()
        if len(tokens) != width * vertex.count:
            raise ValueError(f"ascii PLY vertex lines must hold {width} values each")
        try:
            table = np.array(tokens, dtype=np.float64).reshape(vertex.count, width)
        except ValueError:
            raise ValueError("ascii PLY vertex data contains a value that is not a number") from None
        result = {p.name: table[:, i] for i, p in enumerate(vertex.properties)}
    return result


def ply_binary_bytes(columns: list[tuple[str, np.ndarray]]) -> bytes:
    """Serialise equal-length 1-D columns as a binary little-endian PLY with one vertex element."""
    header, records = _ply_records(columns)
    return header + records.tobytes()


def write_ply_binary(out: BinaryIO, columns: list[tuple[str, np.ndarray]]) -> None:
    """Write what ``ply_binary_bytes`` returns straight into ``out``: one copy of the records in memory, not
    three (a 10M-point heat map is about 190 MB of records)."""
    header, records = _ply_records(columns)
    out.write(header)
    out.write(memoryview(records).cast("B"))


def _ply_records(columns: list[tuple[str, np.ndarray]]) -> tuple[bytes, np.ndarray]:
    n = len(columns[0][1])
    type_names = {np.dtype(v): k for k, v in _PLY_TYPES.items() if k in
                  ("char", "uchar", "short", "ushort", "int", "uint", "float", "double")}
    dtype = np.dtype([(name, "<" + np.dtype(col.dtype).str[1:]) for name, col in columns])
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {type_names[np.dtype(col.dtype).newbyteorder('=')]} {name}"
               for name, col in columns]
    header.append("end_header")
    records = np.empty(n, dtype=dtype)
    for name, col in columns:
        records[name] = col
    return ("\n".join(header) + "\n").encode("ascii"), records
