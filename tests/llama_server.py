"""Start and stop `python -m llama_cpp.server` (llama-cpp-python) on 127.0.0.1 for the real-model tests.

Why a helper and not a bare fixture: both the openai and the langchain tests talk to the same server, and the
start-up
(pick a free port, wait until /v1/models answers, kill on teardown, show the server's log when it dies) is
worth one
careful place.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVER_MODULES = ("llama_cpp", "llama_cpp.server", "uvicorn", "fastapi", "sse_starlette", "starlette_context")


def missing_server_modules() -> list[str]:
    """Modules `python -m llama_cpp.server` needs that are not importable (empty when the server can
    start)."""
    missing = []
    for name in SERVER_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models_answer(base_url: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
            return [m["id"] for m in json.load(response)["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def describe_exit(returncode: int) -> str:
    """'killed by SIGILL (Illegal instruction)' for a signal, 'exited with 1' otherwise: a bare code hides the
    cause."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
            return f"killed by {sig.name} ({signal.strsignal(sig) or 'signal'})"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with {returncode}"


@dataclass
class LlamaServer:
    """A running `python -m llama_cpp.server`: its base URL, and a way to tell whether (and why) it died."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def death(self) -> str | None:
        """None while the server runs; else how it ended and the last lines of its log."""
        code = self.process.poll()
        if code is None:
            return None
        return f"llama_cpp.server {describe_exit(code)}; last lines of {self.log_path}:\n{self.log_tail()}"

    def assert_alive(self) -> None:
        reason = self.death()
        assert reason is None, reason


@contextmanager
def llama_server(
    model_path: str | Path,
    log_path: str | Path,
    *,
    chat_format: str = "chatml-function-calling",
    n_ctx: int = 4096,
    n_threads: int = 2,
    startup_timeout: float = 180.0,
) -> Iterator[LlamaServer]:
    """Serve `model_path` on a free loopback port; the server is killed on exit."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    log_path = Path(log_path)
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--chat_format",
        chat_format,
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(n_threads),
        "--model_alias",
        Path(model_path).stem,
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = LlamaServer(base_url, process, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while _models_answer(base_url) is None:
            if (reason := server.death()) is not None:
                raise RuntimeError(reason)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"llama_cpp.server did not answer within {startup_timeout} s; last lines of "
                    f"{log_path}:\n{server.log_tail()}"
                )
            time.sleep(0.25)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
