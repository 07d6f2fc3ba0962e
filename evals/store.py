"""A run's results on disk: ``<out>/results.jsonl`` plus per-point score files, durable and resumable.

A row is appended one (name, scan) at a time, after that row's per-point scores were written (atomically) to
``<out>/scores/<name>/<class>/<scan>.npy``. A row therefore always has its scores, a rerun skips every (name,
scan)
with an ``ok`` row, and Ctrl-C at any moment leaves a consistent partial result. Failed rows are kept (with
their
reason) and retried by the next run; the latest row of a (name, scan) wins.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from scans import strict_json
from scans.files import atomic_save_npy

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
FIT_META = "fitted.json"


def safe_name(label: str) -> str:
    """A result name as a folder name (backend labels may hold ':' and '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "backend"


@dataclass
class ScanResult:
    row: dict
    scores: np.ndarray | None = None
    regions: np.ndarray | None = (
        None  # int32 (N,) index of the flagged region holding each point, -1 elsewhere
    )


class ResultStore:
    """`<out>/results.jsonl` plus the per-point score files; appends are durable and ordered
    npy-before-row."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / RESULTS_FILE
        self._file = None

    @staticmethod
    def key(row: dict) -> tuple[str, str, str]:
        return (row["name"], row["class"], row["scan"])

    def rows(self) -> list[dict]:
        """Every stored row, latest last; a line torn by a kill mid-write is ignored (its npy may exist,
        harmlessly)."""
        if not self.path.is_file():
            return []
        rows = []
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # torn last line
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows

    def latest(self) -> dict[tuple[str, str, str], dict]:
        latest: dict[tuple[str, str, str], dict] = {}
        for row in self.rows():
            latest[self.key(row)] = row
        return latest

    def done(self) -> set[tuple[str, str, str]]:
        """(name, class, scan) with an ok row whose score file is present."""
        return {
            k
            for k, row in self.latest().items()
            if row.get("status") == "ok" and (self.out / row.get("scores", "")).is_file()
        }

    def __enter__(self) -> Self:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # drop a torn last line so the next row starts clean
                with self.path.open("r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def append(self, result: ScanResult) -> dict:
        assert self._file is not None, "use ResultStore as a context manager"
        row = dict(result.row)
        if result.scores is not None:
            rel = Path("scores") / safe_name(row["name"]) / row["class"] / f"{row['scan']}.npy"
            atomic_save_npy(self.out / rel, np.asarray(result.scores, dtype=np.float32))
            row["scores"] = rel.as_posix()
            if result.regions is not None:
                rel_regions = rel.with_name(f"{row['scan']}.regions.npy")
                atomic_save_npy(self.out / rel_regions, np.asarray(result.regions, dtype=np.int32))
                row["regions_file"] = rel_regions.as_posix()
        line = strict_json.dumps(row, missing_as_null=True, sort_keys=True)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return row
