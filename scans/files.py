"""Writing files so that a reader sees the old file or the new one, never half of one.

Every writer in the project goes through `atomic_write`: the payload goes to a temporary file in the target's
folder (the same filesystem, so the final `os.replace` is atomic), is flushed to disk, and only then takes the
target's name. A failure or Ctrl-C at any point leaves the previous file untouched and no temporary file
behind. JSON documents are made by `scans.strict_json`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np


def umask_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the process's umask (0644/0755 under umask 022).

    Why: temp files from tempfile are 0600 and temp folders 0700; renamed into place they would make some
    outputs
    private and others not. Every writer chmods its temp file to this before the rename."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, suffix: str = ".tmp"
) -> Path:
    """Call `write(handle)` on a temporary binary file beside `path`, then rename it to `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, umask_mode())  # mkstemp's 0600 would make this output private, unlike a plain open()
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    return atomic_write(path, lambda out: out.write(payload))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """`np.save` without pickles, atomically."""
    return atomic_write(path, lambda out: np.save(out, np.asarray(array), allow_pickle=False), suffix=".npy")
