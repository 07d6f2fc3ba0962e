"""JSONL transcript of one agent run: every prompt, reply, tool call, tool result, usage, timing and fallback.

Why: an agent's answer is only as trustworthy as the trail that produced it; a transcript lets a reader replay what the
model saw and said, and lets tests check that real tokens were generated. Secrets never reach the file: every string is
scrubbed of the values of environment variables whose names look like credentials and of the extra secrets given (the
backend's key), and keys whose names look like credentials are dropped entirely (agent.secrets).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TextIO

from agent.secrets import REDACTED, SECRET_ENV, SECRET_FIELD, Redactor, secrets_from_env
from scans import strict_json

__all__ = ["REDACTED", "SECRET_ENV", "SECRET_FIELD", "Transcript", "read_transcript", "secrets_from_env"]


class Transcript:
    """Append-only event log. `path=None` keeps events in memory only (tests, dry runs)."""

    def __init__(self, path: str | Path | None = None, *, extra_secrets: Iterable[str] = ()):
        self.path = Path(path) if path is not None else None
        self.events: list[dict[str, Any]] = []
        self._scrub = Redactor.for_run(extra_secrets, drop_secret_fields=True)
        self._start = time.perf_counter()
        self._file: TextIO | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")

    def log(self, event: str, **fields: Any) -> dict[str, Any]:
        """Record one event; returns the record as written (after redaction)."""
        record = {
            "event": event,
            "t": round(time.perf_counter() - self._start, 4),
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            **self._scrub(fields),
        }
        self.events.append(record)
        if self._file is not None:
            line = strict_json.dumps(record, missing_as_null=True, ensure_ascii=False, default=str)
            self._file.write(line + "\n")
            self._file.flush()
        return record

    def of(self, event: str) -> list[dict[str, Any]]:
        """All recorded events of one kind."""
        return [e for e in self.events if e["event"] == event]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_transcript(path: str | Path) -> list[dict[str, Any]]:
    """Events of a transcript file; a line that is not JSON raises naming the file and line."""
    events = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not JSON ({err.msg})") from None
    return events
