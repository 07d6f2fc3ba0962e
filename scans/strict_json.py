"""Strict JSON for every file and message the project writes: never a bare ``NaN`` or ``Infinity``.

Why: Python's ``json`` writes ``NaN``/``Infinity`` by default, which no other JSON reader accepts (a
report.json with a NaN threshold broke every tool that read it). Two policies, chosen by the writer:

* ``dumps(obj, what=...)`` refuses a non-finite number with an error naming the file and the key, for
  documents where such a value is a bug (a fitted folder's metadata);
* ``dumps(obj, missing_as_null=True)`` writes it as ``null``, for documents where a value is legitimately
  missing (a report's statistic that could not be computed, a metric over no scans).

It is also the project's one converter for the values numpy code and paths produce (``to_json_value``), so
every writer turns them into JSON the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import PurePath
from typing import Any


class NonFiniteJSONError(ValueError):
    """A document meant to be strict JSON holds NaN or an infinity; the message names the document and key."""


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values (what ``json`` can write). Recognised without importing
    numpy: the agent loop and the transcript use this module and must stay free of numpy."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def nan_to_none(value: Any) -> Any:
    """A copy of ``value`` with every non-finite float (Python or numpy, any depth) replaced by ``None``."""
    value = _plain(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    return value


def first_nonfinite(value: Any, path: str = "") -> str | None:
    """The key path (e.g. ``thresholds.patch_p99``) of the first non-finite float in ``value``, or None."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(the document itself)"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        key = str(key)
        joined = key if not path else (path + key if key.startswith("[") else f"{path}.{key}")
        found = first_nonfinite(item, joined)
        if found is not None:
            return found
    return None


def to_json_value(value: Any) -> Any:
    """``json.dumps(default=...)``: numpy scalars and arrays as numbers and lists, paths as strings; anything
    else is a TypeError naming its type."""
    if isinstance(value, PurePath):
        return str(value)
    plain = _plain(value)
    if plain is value:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")
    return plain


def dumps(obj: Any, *, what: str = "json document", missing_as_null: bool = False, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN/Infinity: null for them (``missing_as_null``) or
    NonFiniteJSONError naming ``what`` (usually the file) and the key. numpy values and paths are written as
    ``to_json_value`` makes them."""
    if missing_as_null:
        obj = nan_to_none(obj)
    kwargs.setdefault("default", to_json_value)
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        key = first_nonfinite(obj)
        if key is None:
            raise
        raise NonFiniteJSONError(
            f"{what}: {key} is not a finite number (NaN or infinite); refusing to write invalid JSON"
        ) from None
