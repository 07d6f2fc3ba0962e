"""Output folders written whole, and replaced only when this tool wrote them.

Every folder scanagent writes (a scan's outputs, a fitted class) is built under a temporary name beside its target,
carries a marker file naming what it is, and is swapped into place by renames. Why a marker: a rerun replaces the
earlier outputs of the same scan, but a folder of the user's that happens to sit where an output would go must never
be deleted; only a folder with the marker (or an empty one) is ever replaced, anything else is refused with an
:class:`OutputError` naming it.

Why renames and a retry loop: two processes writing the same target (two runs into one --out) must not trip over each
other. The new folder is renamed onto the target, which succeeds atomically when nothing is there; when an earlier
output is in the way it is renamed aside first (a concurrent writer may have moved it already, or put its own result
in place meanwhile: both are retried), so the target always ends up holding one complete output.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scans.io import umask_mode

MARKER_FILE = ".scanagent"
WRITER = "scanagent"
SWAP_ATTEMPTS = 50      # each failed attempt means another writer changed the target in between
# rename(2) errors that mean "something is in the way at the target"
_OCCUPIED = {errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}

OwnershipTest = Callable[[Path], bool]


class OutputError(ValueError):
    """An output place that cannot or must not be written; the message starts with the path (exit 2 in the CLIs)."""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Refuse early a folder that could not be created or written, so no work is spent before the write would fail.

    Probes by making (and removing) a temporary entry in the folder, or in its nearest existing ancestor when it does
    not exist yet: permission bits alone say nothing when running as root, and read-only mounts fail only on write."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: the {what} exists and is a file, not a folder")
    probe_in = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not probe_in.is_dir():
        raise OutputError(f"{path}: the {what} cannot be created: {probe_in} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".scanagent-probe-", dir=probe_in))
    except OSError as exc:
        where = "" if probe_in == path else f" (in {probe_in})"
        raise OutputError(f"{path}: the {what} cannot be written{where}: {_reason(exc)}") from None


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as a `kind` folder written by this tool (what makes it replaceable later)."""
    (folder / MARKER_FILE).write_text(json.dumps({"written_by": WRITER, "kind": kind}) + "\n")


def marker_kind(folder: Path) -> str | None:
    """The kind a marked folder holds, or None when it has no (readable, regular) marker file."""
    marker = folder / MARKER_FILE
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return None
        data = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != WRITER:
        return None
    kind = data.get("kind")
    return kind if isinstance(kind, str) else None


def check_replaceable(target: str | os.PathLike, kind: str, also_ours: OwnershipTest | None = None) -> None:
    """Return quietly if `target` is absent, empty or a `kind` folder this tool wrote; else raise OutputError.

    `also_ours` accepts folders written before markers existed (a fitted class recognises its own metadata file)."""
    path = Path(target)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        thing = "a symbolic link" if stat.S_ISLNK(mode) else "a file"
        raise OutputError(f"{path}: exists and is {thing}, not a {kind} folder; refusing to replace it "
                          "(move it away or choose another --out)")
    found = marker_kind(path)
    if found == kind or (found is None and also_ours is not None and also_ours(path)):
        return
    try:
        if not any(path.iterdir()):
            return  # an empty folder: replacing it loses nothing
    except FileNotFoundError:
        return  # a concurrent writer moved it away meanwhile
    except OSError as exc:
        raise OutputError(f"{path}: cannot be read ({_reason(exc)}); refusing to replace it") from None
    holds = f"holds scanagent's {found}" if found else f"has no {MARKER_FILE} marker"
    raise OutputError(f"{path}: exists and is not a {kind} folder written by scanagent ({holds}); refusing to "
                      "replace it (move it away or choose another --out)")


def replace_dir(staging: Path, target: Path, kind: str, also_ours: OwnershipTest | None = None) -> None:
    """Rename the complete folder `staging` to `target`, moving an earlier output of this tool out of the way.

    Safe against a concurrent writer of the same target: whichever rename lands last wins, and neither raises."""
    retired: list[Path] = []
    try:
        for _ in range(SWAP_ATTEMPTS):
            try:
                os.rename(staging, target)  # atomic; succeeds when the target is absent or an empty folder
                return
            except OSError as exc:
                if exc.errno not in _OCCUPIED:
                    raise OutputError(f"{target}: cannot be written ({_reason(exc)})") from None
            check_replaceable(target, kind, also_ours)
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            retired.append(aside)
            try:
                os.rename(target, aside / "old")
            except FileNotFoundError:
                pass  # a concurrent writer moved it first; try again
        raise OutputError(f"{target}: kept changing while being replaced ({SWAP_ATTEMPTS} attempts); try again")
    except OSError as exc:  # making the aside folder or moving the old output failed: not a race
        _restore(retired, target)
        raise OutputError(f"{target}: cannot be replaced ({_reason(exc)})") from None
    except BaseException:
        _restore(retired, target)
        raise
    finally:
        for aside in retired:
            shutil.rmtree(aside, ignore_errors=True)


def _restore(retired: list[Path], target: Path) -> None:
    """After a failed swap, put the last output moved aside back if nothing took its place."""
    for aside in reversed(retired):
        if (aside / "old").exists():
            try:
                os.rename(aside / "old", target)
            except OSError:
                pass
            return


@contextmanager
def staged_dir(target: str | os.PathLike, kind: str, *, also_ours: OwnershipTest | None = None) -> Iterator[Path]:
    """Yield an empty marked folder beside `target`; on success it replaces `target`, on any error it is removed.

    Refuses (OutputError) before the caller's work when `target` is someone else's file or folder."""
    target = Path(target)
    check_replaceable(target, kind, also_ours)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as exc:
        raise OutputError(f"{target}: cannot be written ({_reason(exc)})") from None
    try:
        write_marker(staging, kind)
        yield staging
        os.chmod(staging, umask_mode(directory=True))  # mkdtemp's 0700 would make the output folder private
        replace_dir(staging, target, kind, also_ours)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
