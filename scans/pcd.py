"""Parser for PCL's ``.pcd`` point-cloud format (ascii, binary and binary_compressed).

Written by hand because no installed library exposes PCD fields as plain arrays: open3d reads PCD but
drops unknown fields such as ``label`` and gives no control over validation messages. The parser raises
``ValueError`` with a short problem description (never quoting file content); ``tools.io`` prefixes it
with the file path.

Format reference: https://pointclouds.org/documentation/tutorials/pcd_file_format.html and PCL's
``pcd_io.cpp`` for the binary_compressed layout (LZF-compressed, fields stored column after column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (TYPE letter, SIZE) -> numpy scalar type. PCD data is little-endian in practice (PCL writes x86 host order).
_PCD_DTYPES: dict[tuple[str, int], str] = {
    ("F", 4): "<f4",
    ("F", 8): "<f8",
    ("I", 1): "i1",
    ("I", 2): "<i2",
    ("I", 4): "<i4",
    ("I", 8): "<i8",
    ("U", 1): "u1",
    ("U", 2): "<u2",
    ("U", 4): "<u4",
    ("U", 8): "<u8",
}
_DATA_KINDS = ("ascii", "binary", "binary_compressed")
_MAX_HEADER_LINES = 64  # a PCD header has ~11 lines; a file without DATA within this many lines is not a PCD


@dataclass(frozen=True)
class PCDHeader:
    """What the header declares; ``data_offset`` is the byte where the point data starts."""

    fields: tuple[str, ...]
    sizes: tuple[int, ...]
    types: tuple[str, ...]
    counts: tuple[int, ...]
    width: int
    height: int
    points: int
    data_kind: str
    data_offset: int

    def record_dtype(self) -> np.dtype:
        """Packed row dtype of one point; padding fields named '_' get unique names so numpy accepts them."""
        entries = []
        for i, (name, size, kind, count) in enumerate(zip(self.fields, self.sizes, self.types, self.counts)):
            base = _PCD_DTYPES[(kind, size)]
            unique = name if name != "_" else f"_pad{i}"
            entries.append((unique, base) if count == 1 else (unique, base, (count,)))
        return np.dtype(entries)


def _ints(values: list[str], key: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"PCD header line {key} must hold integers") from None
    if any(v < 0 for v in out):
        raise ValueError(f"PCD header line {key} holds a negative number")
    return out


def parse_pcd_header(data: bytes) -> PCDHeader:
    """Parse the header up to and including the DATA line; raise ValueError when it is malformed."""
    entries: dict[str, list[str]] = {}
    offset = 0
    for _ in range(_MAX_HEADER_LINES):
        end = data.find(b"\n", offset)
        if end < 0:
            raise ValueError("PCD header has no DATA line (file truncated or not a PCD file)")
        raw = data[offset:end]
        offset = end + 1
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError("PCD header contains non-text bytes (not a PCD file)") from None
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        entries[key.upper()] = values
        if key.upper() == "DATA":
            break
    else:
        raise ValueError("PCD header has no DATA line within the first lines (not a PCD file)")

    for required in ("FIELDS", "SIZE", "TYPE", "DATA"):
        if required not in entries:
            raise ValueError(f"PCD header lacks the {required} line")
    fields = tuple(entries["FIELDS"])
    sizes = _ints(entries["SIZE"], "SIZE")
    types = tuple(t.upper() for t in entries["TYPE"])
    counts = _ints(entries["COUNT"], "COUNT") if "COUNT" in entries else (1,) * len(fields)
    if not (len(fields) == len(sizes) == len(types) == len(counts)) or not fields:
        raise ValueError("PCD header FIELDS/SIZE/TYPE/COUNT have different lengths")
    for size, kind in zip(sizes, types):
        if (kind, size) not in _PCD_DTYPES:
            raise ValueError(f"PCD header has unsupported TYPE {kind} with SIZE {size}")
    width = _ints(entries.get("WIDTH", ["0"]), "WIDTH")[0] if entries.get("WIDTH") else 0
    height = _ints(entries.get("HEIGHT", ["1"]), "HEIGHT")[0] if entries.get("HEIGHT") else 1
    if entries.get("POINTS"):
        points = _ints(entries["POINTS"], "POINTS")[0]
    else:
        points = width * height
    if width == 0:  # old files may give only POINTS
        width, height = points, 1
    if width * height != points:
        raise ValueError(f"PCD header WIDTH x HEIGHT ({width} x {height}) differs from POINTS ({points})")
    if not entries["DATA"] or entries["DATA"][0].lower() not in _DATA_KINDS:
        raise ValueError(f"PCD DATA must be one of {', '.join(_DATA_KINDS)}")
    return PCDHeader(fields, sizes, types, counts, width, height, points, entries["DATA"][0].lower(), offset)


def lzf_decompress(src: bytes, expected_size: int) -> bytes:
    """Decompress an LZF stream (liblzf format, as PCL writes it) into exactly ``expected_size`` bytes.

    Pure Python because no LZF package is installed; literal runs and non-overlapping back references are
    copied as slices, so a few MB decode in well under a second.
    """
    out = bytearray()
    n = len(src)
    i = 0
    while i < n:
        ctrl = src[i]
        i += 1
        if ctrl < 32:  # literal run of ctrl + 1 bytes
            run = ctrl + 1
            if i + run > n:
                raise ValueError("LZF stream is truncated inside a literal run")
            out += src[i : i + run]
            i += run
            continue
        length = ctrl >> 5
        if length == 7:
            if i >= n:
                raise ValueError("LZF stream is truncated inside a back reference")
            length += src[i]
            i += 1
        if i >= n:
            raise ValueError("LZF stream is truncated inside a back reference")
        start = len(out) - ((ctrl & 0x1F) << 8) - src[i] - 1
        i += 1
        length += 2
        if start < 0:
            raise ValueError("LZF stream refers before the start of the output (corrupt data)")
        distance = len(out) - start
        if distance >= length:
            out += out[start : start + length]
        else:  # overlapping copy repeats the last `distance` bytes
            pattern = bytes(out[start:])
            reps, rest = divmod(length, distance)
            out += pattern * reps + pattern[:rest]
        if len(out) > expected_size:
            break
    if len(out) != expected_size:
        raise ValueError(f"LZF data decompresses to {len(out)} bytes, header says {expected_size}")
    return bytes(out)


def _split_record(records: np.ndarray, header: PCDHeader) -> dict[str, np.ndarray]:
    """Map a structured record array to {field name: (N,) or (N, count) array}; padding fields are dropped."""
    out: dict[str, np.ndarray] = {}
    for name, unique in zip(header.fields, records.dtype.names or ()):
        if name == "_":
            continue
        out[name] = np.ascontiguousarray(records[unique])
    return out


def decode_pcd_body(data: bytes, header: PCDHeader) -> dict[str, np.ndarray]:
    """Decode the point data after the header into named field arrays of length ``header.points``."""
    dtype = header.record_dtype()
    n = header.points
    body = memoryview(data)[header.data_offset :]
    if header.data_kind == "binary":
        need = n * dtype.itemsize
        if len(body) < need:
            raise ValueError(
                f"binary PCD is truncated: header declares {n} points ({need} bytes) "
                f"but only {len(body)} bytes follow"
            )
        records = np.frombuffer(body, dtype=dtype, count=n)
        return _split_record(records, header)

    if header.data_kind == "binary_compressed":
        if len(body) < 8:
            raise ValueError("binary_compressed PCD is truncated: the size words are missing")
        compressed_size, raw_size = np.frombuffer(body[:8], dtype="<u4")
        need = n * dtype.itemsize
        if raw_size != need:
            raise ValueError(
                f"binary_compressed PCD declares {raw_size} uncompressed bytes, {n} points need {need}"
            )
        if len(body) - 8 < compressed_size:
            raise ValueError(
                f"binary_compressed PCD is truncated: {compressed_size} compressed bytes "
                f"declared, {len(body) - 8} present"
            )
        raw = lzf_decompress(bytes(body[8 : 8 + int(compressed_size)]), int(raw_size)) if n else b""
        # Column layout: every field's values for all points, one field after the other.
        out: dict[str, np.ndarray] = {}
        pos = 0
        for name, size, kind, count in zip(header.fields, header.sizes, header.types, header.counts):
            nbytes = n * size * count
            column = np.frombuffer(raw, dtype=_PCD_DTYPES[(kind, size)], count=n * count, offset=pos)
            pos += nbytes
            if name != "_":
                out[name] = column.reshape(n, count) if count > 1 else column.copy()
        return out

    # ascii: one point per line, sum(COUNT) numbers per line.
    text = bytes(body).decode("ascii", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != n:
        raise ValueError(
            f"ascii PCD has {len(lines)} data lines, header declares {n} points"
            + (" (file truncated)" if len(lines) < n else "")
        )
    width = sum(header.counts)
    tokens = " ".join(lines).split()
    if len(tokens) != n * width:
        raise ValueError(f"ascii PCD rows must have {width} values each (FIELDS x COUNT)")
    try:
        table = np.array(tokens, dtype=np.float64).reshape(n, width)
    except ValueError:
        raise ValueError("ascii PCD data contains a value that is not a number") from None
    out = {}
    col = 0
    for name, count in zip(header.fields, header.counts):
        if name != "_":
            out[name] = table[:, col] if count == 1 else table[:, col : col + count]
        col += count
    return out
