"""A folder's integrity manifest: the sha256 of every file, written when the folder is saved, checked on load.

Why: a fitted class is a folder of arrays and json (bank, mean feature, thresholds, backbone). A flipped bit
in bank.npy still loads as a valid array and silently changes every score, so shape and dtype checks are not
enough: each file's bytes must be the ones that were saved. The manifest lists the files by their path inside
the folder; a file that is missing, changed, or not listed where it should be is refused with its path named.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from scans import strict_json

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "scanagent-manifest"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """A folder does not match its manifest; the message names the file and the problem."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (bank files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(folder: Path) -> list[str]:
    """Every regular file below ``folder`` except the manifest, as sorted posix paths relative to it."""
    out = []
    for path in folder.rglob("*"):
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST_FILE:
            out.append(path.relative_to(folder).as_posix())
    return sorted(out)


def write_manifest(folder: str | os.PathLike) -> Path:
    """Hash every file in ``folder`` (recursively) into ``folder/manifest.json``; call it after all writes."""
    root = Path(folder)
    files = {name: file_sha256(root / name) for name in _files_under(root)}
    document = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "sha256": files}
    path = root / MANIFEST_FILE
    path.write_text(strict_json.dumps(document, what=str(path), indent=2, sort_keys=True))
    return path


def verify_manifest(folder: str | os.PathLike, required: Iterable[str] = ()) -> None:
    """Raise ManifestError unless every file the manifest lists exists with the recorded sha256, and every
    ``required`` file is listed. Files not listed are ignored (e.g. a marker another tool adds later)."""
    import json

    root = Path(folder)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path}: missing: the folder cannot be checked for damage (it was written by an "
                            "older version or an interrupted save); refit the class")
    try:
        document = json.loads(path.read_text())
        listed = dict(document["sha256"])
        if document.get("format") != MANIFEST_FORMAT or document.get("version") != MANIFEST_VERSION:
            raise ValueError("another format or version")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"unreadable or not a manifest ({type(exc).__name__})"
        raise ManifestError(f"{path}: {problem}; refit the class") from None
    unsafe = [name for name in listed if name.startswith("/") or ".." in Path(name).parts]
    if unsafe:
        raise ManifestError(f"{path}: lists a file outside the folder ({unsafe[0]!r}); refit the class")
    for name in sorted(set(required) - set(listed)):
        raise ManifestError(f"{root / name}: not listed in {MANIFEST_FILE}; refit the class")
    for name, expected in sorted(listed.items()):
        target = root / name
        if not target.is_file():
            raise ManifestError(f"{target}: missing (listed in {MANIFEST_FILE}); refit the class")
        if file_sha256(target) != expected:
            raise ManifestError(f"{target}: damaged or modified since the fit was saved (sha256 differs from "
                                f"{MANIFEST_FILE}); refit the class")
