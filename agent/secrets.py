"""Which strings of a run are secrets, and replacing them wherever the run writes or prints.

Why one module: a key reaches the outputs by many roads -- a server's 401 message that echoes the Authorization header
becomes a backend error, then a fallback reason in report.json, a transcript event and a line on the console. Every
writer (transcript, report, terminal, logging) scrubs with the same `Redactor`, built from the same two sources: the
environment's credential-looking variables and the credential-looking backend arguments the run was given.

Values shorter than MIN_SECRET_LEN are never treated as secrets: an environment variable such as
TOKENIZERS_PARALLELISM=false would otherwise redact the word "false" from every report.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

# Environment variables whose values are credentials (OPENAI_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...).
SECRET_ENV = re.compile(r"(API_?KEY|ACCESS_?KEY|SECRET|PASSWORD|PASSWD|TOKEN)", re.IGNORECASE)
# Argument names (backend kwargs, header names) whose string values are credentials; not "max_tokens" or "tokenizer".
SECRET_ARG = re.compile(r"(api_?key|secret|password|passwd|authorization|credential|(^|_)token$)", re.IGNORECASE)
# Record fields dropped outright from transcripts (but not e.g. "prompt_tokens").
SECRET_FIELD = re.compile(r"^(api_?key|authorization|password|secret|token|access_token|bearer)$", re.IGNORECASE)
REDACTED = "[redacted]"
MIN_SECRET_LEN = 8
AUTH_SCHEMES = ("bearer ", "basic ", "token ")


def secrets_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look like credentials (OPENAI_API_KEY, HF_TOKEN, ...)."""
    env = os.environ if environ is None else environ
    return [v for k, v in env.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LEN]


def secrets_in(arguments: Any) -> list[str]:
    """String values under credential-looking names anywhere in `arguments` (nested dicts and lists included), and
    the bare credential of an "Authorization: Bearer <key>" value."""
    found: list[str] = []
    if isinstance(arguments, Mapping):
        for key, value in arguments.items():
            if isinstance(value, str) and SECRET_ARG.search(str(key)):
                found.append(value)
                lowered = value.lower()
                for scheme in AUTH_SCHEMES:
                    if lowered.startswith(scheme):
                        found.append(value[len(scheme):].strip())
            else:
                found.extend(secrets_in(value))
    elif isinstance(arguments, (list, tuple)):
        for value in arguments:
            found.extend(secrets_in(value))
    return [s for s in found if len(s) >= MIN_SECRET_LEN]


class Redactor:
    """Replaces every known secret in strings, and in the strings inside dicts and lists."""

    def __init__(self, secrets: Iterable[str] = (), *, drop_secret_fields: bool = False):
        self.secrets = sorted({s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LEN},
                              key=len, reverse=True)  # longest first: a key that contains another is removed whole
        self.drop_secret_fields = drop_secret_fields

    @classmethod
    def for_run(cls, *extra: Iterable[str], drop_secret_fields: bool = False) -> Redactor:
        """The environment's secrets plus each given collection (a backend's `secrets`, `secrets_in(kwargs)`)."""
        secrets = list(secrets_from_env())
        for more in extra:
            secrets.extend(more)
        return cls(secrets, drop_secret_fields=drop_secret_fields)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        return value

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: (REDACTED if self.drop_secret_fields and SECRET_FIELD.search(str(k)) else self(v))
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value


def backend_secrets(*backends: Any) -> list[str]:
    """The secrets backends declare (`secrets`: e.g. the API key an openai backend was given)."""
    found: list[str] = []
    for backend in backends:
        found.extend(getattr(backend, "secrets", ()) or ())
    return found


class RedactedStream(io.TextIOBase):
    """A text stream that scrubs what is written and passes it on (the terminal: rich prints through one of these)."""

    def __init__(self, stream: TextIO, redact: Callable[[str], str]):
        self._stream = stream
        self._redact = redact

    def write(self, text: str) -> int:
        self._stream.write(self._redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")


@contextmanager
def redacted_logging(redactor: Redactor) -> Iterator[None]:
    """Every log record made inside the block has its message scrubbed (the SDKs' own loggers included)."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a record whose arguments do not format is left to logging's own report
            return record
        record.msg, record.args = redactor.text(message), ()
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)
