"""The llama.cpp server helper must say why a server died (signal and log), not leave a bare assertion.

A real child process that kills itself with SIGILL stands in for llama.cpp's "Illegal instruction" crash, so
this
runs without llama-cpp-python.
"""

from __future__ import annotations

import subprocess
import sys

from llama_server import LlamaServer, describe_exit


def test_describe_exit_names_the_signal():
    assert describe_exit(-4).startswith("killed by SIGILL")
    assert describe_exit(1) == "exited with 1"


def test_a_crashed_server_reports_its_signal_and_log(tmp_path):
    log = tmp_path / "server.log"
    script = (
        "import os, signal, sys; print('ggml_backend_amx_mul_mat: tileloadd', flush=True); "
        "os.kill(os.getpid(), signal.SIGILL)"
    )
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
    process.wait(timeout=30)
    server = LlamaServer("http://127.0.0.1:9/v1", process, log)
    reason = server.death()
    assert reason is not None and "SIGILL" in reason and "tileloadd" in reason
    try:
        server.assert_alive()
    except AssertionError as err:
        assert "SIGILL" in str(err)
    else:
        raise AssertionError("assert_alive passed for a dead server")


def test_a_running_server_is_alive(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        server = LlamaServer("http://127.0.0.1:9/v1", process, tmp_path / "none.log")
        assert server.death() is None
        server.assert_alive()
    finally:
        process.kill()
        process.wait(timeout=10)
