"""JSONL transcript of one agent run: every prompt, reply, tool call, tool result, usage, timing and fallback.

Why: an agent's answer is only as trustworthy as the trail that produced it; a transcript lets a reader replay what the
model saw and said, and lets tests check that real tokens were generated. Secrets never reach the file: every string is
scrubbed of the values of environment variables whose names look like credentials (and of any extra secrets given), and
keys whose names look like credentials are dropped entirely.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TextIO

from scans import strict_json

# Environment variables whose values are credentials (OPENAI_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...).
SECRET_ENV = re.compile(r"(API_?KEY|ACCESS_?KEY|SECRET|PASSWORD|PASSWD|(^|_)TOKEN$)", re.IGNORECASE)
# Record fields dropped outright (but not e.g. "prompt_tokens").
SECRET_FIELD = re.compile(r"^(api_?key|authorization|password|secret|token|access_token|bearer)$", re.IGNORECASE)
REDACTED = "[redacted]"
MIN_SECRET_LEN = 6  # shorter values (e.g. "1") would redact ordinary text


def secrets_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look like credentials (OPENAI_API_KEY, HF_TOKEN, ...)."""
    env = os.environ if environ is None else environ
    return [v for k, v in env.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LEN]


class Transcript:
    """Append-only event log. `path=None` keeps events in memory only (tests, dry runs)."""

    def __init__(self, path: str | Path | None = None, *, extra_secrets: Iterable[str] = ()):
        self.path = Path(path) if path is not None else None
        self.events: list[dict[str, Any]] = []
        self._secrets = sorted({s for s in [*secrets_from_env(), *extra_secrets] if len(s) >= MIN_SECRET_LEN},
                               key=len, reverse=True)
        self._start = time.perf_counter()
        self._file: TextIO | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: (REDACTED if SECRET_FIELD.search(str(k)) else self._scrub(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._scrub(v) for v in value]
        return value

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
