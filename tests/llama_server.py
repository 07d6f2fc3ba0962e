"""Start and stop `python -m llama_cpp.server` (llama-cpp-python) on 127.0.0.1 for the real-model tests.

Why a helper and not a bare fixture: both the openai and the langchain tests talk to the same server, and the start-up
(pick a free port, wait until /v1/models answers, kill on teardown, show the server's log when it dies) is worth one
careful place.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVER_MODULES = ("llama_cpp", "llama_cpp.server", "uvicorn", "fastapi", "sse_starlette", "starlette_context")


def missing_server_modules() -> list[str]:
    """Modules `python -m llama_cpp.server` needs that are not importable (empty when the server can start)."""
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


@contextmanager
def llama_server(model_path: str | Path, log_path: str | Path, *, chat_format: str = "chatml-function-calling",
                 n_ctx: int = 4096, n_threads: int = 2, startup_timeout: float = 180.0) -> Iterator[str]:
    """Serve `model_path` and yield the OpenAI base URL (http://127.0.0.1:PORT/v1); the server is killed on exit."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
               "--port", str(port), "--chat_format", chat_format, "--n_ctx", str(n_ctx),
               "--n_threads", str(n_threads), "--model_alias", Path(model_path).stem]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout
        while _models_answer(base_url) is None:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {process.returncode}; log {log_path}:\n"
                                   + Path(log_path).read_text()[-2000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not answer within {startup_timeout} s; log {log_path}")
            time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
