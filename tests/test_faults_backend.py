"""Backend faults end to end (issue 10 items 3, 9, 11; issue 11; issue 13 item 5): a server whose 401 echoes
the key
leaves no trace of it in report.json, transcript.jsonl or the terminal; `--backend langchain --model
module:Class` loads
that class; a hung server costs the per-scan time budget, after which the policy finishes and the report says
why; the
openai SDK's own retries honour Retry-After; a backend that cannot read `--guidance` says so.

Servers are real http.server instances on 127.0.0.1 in a thread; the hung one holds requests until the test
releases
it (at most HOLD_SECONDS), so nothing outlives a test."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import pytest

import agent.run as run_cli
from agent.backends import get_backend
from agent.backends.base import LLMReply
from agent.backends.policy import PolicyBackend
from agent.loop import AgentBudget, run_agent
from agent.secrets import Redactor, redacted_logging
from scans.io import write_pcd
from tests.tiny import part_scans

KEY = "sk-test-7f3a9c21e8b44d06a5d2"
HOLD_SECONDS = 20.0
MODELS = {
    "object": "list",
    "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "test"}],
}


class LocalServer:
    """An OpenAI-shaped server on 127.0.0.1: POST is answered by `on_post(handler, server)`, GET by `on_get`
    (default:
    the model list)."""

    def __init__(self, on_post: Any, on_get: Any = None):
        self.release = threading.Event()
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if on_get is None:
                    self.send_json(200, MODELS)
                else:
                    on_get(self, outer)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts += 1
                on_post(self, outer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def echo_401(handler: Any, server: LocalServer) -> None:
    """What a careless proxy does: the 401 body repeats the credential it was sent."""
    handler.send_json(
        401,
        {
            "error": {
                "message": f"invalid credential {handler.headers.get('Authorization')}",
                "type": "invalid_request_error",
            }
        },
    )


def hang(handler: Any, server: LocalServer) -> None:
    """Accept the request and never answer (until the test ends)."""
    server.release.wait(HOLD_SECONDS)


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "part.pcd"
    write_pcd(path, part_scans(1, 1500, seed=50)[0])
    return path


def run(*argv: object) -> int:
    return run_cli.main([str(a) for a in argv])


def outputs(out: Path) -> tuple[dict, str]:
    folder = out / "part"
    return json.loads((folder / "report.json").read_text()), (folder / "transcript.jsonl").read_text()


# ---- issue 10 item 3: a key never leaks
# --------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["backend-kwargs", "environment"])
def test_a_401_that_echoes_the_key_leaves_no_trace_of_it(given, scan_file, tmp_path, capsys, monkeypatch):
    kwargs: dict[str, Any] = {"max_retries": 0, "timeout": 10}
    if given == "backend-kwargs":
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        kwargs["api_key"] = KEY
    else:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with LocalServer(echo_401) as server:
        code = run(
            scan_file,
            "--out",
            tmp_path,
            "--no-render",
            "--backend",
            "openai",
            "--base-url",
            server.url,
            "--model",
            "fake-model",
            "--backend-kwargs",
            json.dumps(kwargs),
            "--guidance",
            "rims are normal",
        )
    assert code == 0 and server.posts == 1
    report, transcript = outputs(tmp_path)
    assert report["fallback"]["used"] and "AuthenticationError" in report["fallback"]["reason"]
    assert "[redacted]" in report["fallback"]["reason"]
    terminal = capsys.readouterr()
    for text in (json.dumps(report), transcript, terminal.out, terminal.err):
        assert KEY not in text and KEY[3:15] not in text
    # issue 13 item 5: the fallback policy made the report, and says how it read the guidance
    assert report["guidance"]["reporting_backend"] == "policy" and report["guidance"]["used"] is True
    assert report["guidance"]["read"]["normal_features"] == ["edges"]
    assert "guidance read" in terminal.out


def test_a_key_echoed_while_probing_the_server_is_not_printed(scan_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    with LocalServer(echo_401, on_get=echo_401) as server:
        code = run(
            scan_file,
            "--out",
            tmp_path / "out",
            "--backend",
            "openai",
            "--base-url",
            server.url,
            "--backend-kwargs",
            json.dumps({"api_key": KEY, "max_retries": 0}),
        )
    terminal = capsys.readouterr()
    assert code == 3 and "backend unavailable" in terminal.out and "401" in terminal.out
    assert KEY not in terminal.out + terminal.err


class ChattyChatModel:
    """A chat model class whose constructor error repeats the arguments it was given, the key among them."""

    def __init__(self, **kwargs: Any):
        raise ValueError(f"cannot start with {kwargs}")


def test_an_error_that_repeats_the_backend_kwargs_is_printed_without_the_key(scan_file, tmp_path, capsys):
    pytest.importorskip("langchain_core")
    code = run(
        scan_file,
        "--out",
        tmp_path / "out",
        "--backend",
        "langchain",
        "--model",
        "tests.test_faults_backend:ChattyChatModel",
        "--backend-kwargs",
        json.dumps({"api_key": KEY}),
    )
    terminal = capsys.readouterr()
    assert code == 2 and "bad backend options" in terminal.out and "[redacted]" in terminal.out
    assert KEY not in terminal.out + terminal.err


def test_log_records_are_scrubbed(caplog):
    with caplog.at_level(logging.INFO), redacted_logging(Redactor([KEY])):
        logging.getLogger("openai").info("request failed: Bearer %s", KEY)
    assert caplog.records and KEY not in caplog.text and "[redacted]" in caplog.text


# ---- issue 10 item 9: --model module:Class for langchain
# ---------------------------------------------------------
class ReportingChatModel:
    """A LangChain-shaped chat model (bind_tools + invoke) that reports no suspects on its first turn."""

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs

    def bind_tools(self, tools: list[dict], **kwargs: Any) -> ReportingChatModel:
        return self

    def invoke(self, messages: list[Any]) -> Any:
        from langchain_core.messages import AIMessage

        return AIMessage(
            content="", tool_calls=[{"name": "report_suspects", "args": {"regions": []}, "id": "c1"}]
        )


def test_langchain_model_flag_names_the_chat_model_class(scan_file, tmp_path):
    pytest.importorskip("langchain_core")
    code = run(
        scan_file,
        "--out",
        tmp_path,
        "--no-render",
        "--backend",
        "langchain",
        "--model",
        "tests.test_faults_backend:ReportingChatModel",
        "--backend-kwargs",
        '{"temperature": 0}',
    )
    assert code == 0
    report, _ = outputs(tmp_path)
    assert report["backend"] == "langchain" and report["reporting_backend"] == "langchain"
    assert not report["fallback"]["used"] and report["regions"] == []


# ---- issue 10 item 11: a hung server costs the time budget, then the policy finishes
# -----------------------------
def test_a_hung_server_costs_the_time_budget_then_the_policy_reports(
    scan_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with LocalServer(hang) as server:
        code = run(
            scan_file,
            "--out",
            tmp_path,
            "--no-render",
            "--backend",
            "openai",
            "--base-url",
            server.url,
            "--model",
            "fake-model",
            "--max-seconds",
            "1.5",
            "--backend-kwargs",
            json.dumps({"timeout": HOLD_SECONDS / 2, "max_retries": 1}),
        )
        posts = server.posts
    assert code == 0 and posts == 1  # the one request that hung; no retry once the budget was spent
    report, transcript = outputs(tmp_path)
    assert report["fallback"]["used"] and report["reporting_backend"] == "policy"
    assert report["fallback"]["reason"].startswith("budget: max_seconds=1.5 exceeded")
    assert "max_seconds=1.5" in capsys.readouterr().out
    assert '"event": "budget_exceeded"' in transcript


class BlockingBackend:
    """A backend whose call blocks (a LangChain model or a local generation that cannot be told a
    deadline)."""

    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()

    def chat(self, messages: list[dict], tools: list[dict]) -> LLMReply:
        self.release.wait(HOLD_SECONDS)
        return LLMReply(text="too late")


def test_a_backend_that_blocks_is_abandoned_at_the_time_budget():
    from test_loop import TASK, FakeToolBox

    blocking = BlockingBackend()
    try:
        outcome = run_agent(
            blocking, FakeToolBox(), TASK, budget=AgentBudget(max_seconds=0.5), fallback=PolicyBackend()
        )
    finally:
        blocking.release.set()
    assert outcome.fallback_used and outcome.backend == "policy" and outcome.reported
    assert outcome.fallback_reason.startswith(
        "budget: max_seconds=0.5 exceeded: the backend had not answered"
    )


def test_openai_call_given_seconds_left_makes_no_attempt_after_them(monkeypatch):
    import openai

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with LocalServer(hang) as server:
        backend = get_backend(
            "openai",
            base_url=server.url,
            model="fake-model",
            timeout=HOLD_SECONDS / 2,
            max_retries=4,
            backoff_base=0.001,
        )
        with pytest.raises(openai.APITimeoutError):
            backend.chat([{"role": "user", "content": "hi"}], [], seconds_left=0.5)
        posts = server.posts
    assert posts == 1 and backend.attempts == 3  # probe, the hung POST, one retry refused before it was sent


# ---- issue 11: the SDK's retries, which honour Retry-After
# -------------------------------------------------------
def test_openai_retries_are_the_sdks_and_honour_retry_after(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    waits: list[float] = []
    monkeypatch.setattr("openai._base_client.time.sleep", waits.append)
    answers = iter(
        [(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "250"}), (200, _completion(), {})]
    )

    def scripted(handler: Any, server: LocalServer) -> None:
        status, body, headers = next(answers)
        handler.send_json(status, body, headers)

    with LocalServer(scripted) as server:
        backend = get_backend(
            "openai", base_url=server.url, model="fake-model", backoff_base=0.001, timeout=5
        )
        reply = backend.chat([{"role": "user", "content": "hi"}], [])
    assert reply.text == "ok" and server.posts == 2
    assert waits == pytest.approx([0.25])  # the server's Retry-After, not our 0.001 s backoff


def _completion() -> dict:
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


# ---- issue 13 item 5: guidance is never silently ignored
# ---------------------------------------------------------
def test_policy_says_how_it_read_and_applied_the_guidance(scan_file, tmp_path, capsys):
    assert run(scan_file, "--out", tmp_path, "--no-render", "--guidance", "sharp ridges are normal") == 0
    report, _ = outputs(tmp_path)
    guidance = report["guidance"]
    assert guidance["used"] is True and guidance["note"] is None and guidance["reporting_backend"] == "policy"
    assert guidance["read"]["normal_features"] == ["edges"] and "learned recogniser" in guidance["applied"]
    assert guidance["normal_features"]["kinds"] == ["edges"]  # applied by agent.normal_features, and said so
    assert guidance["normal_features"]["recogniser"] == "normal-features.json"
    out = capsys.readouterr().out
    assert "guidance read" in out and "normal features (edges): the learned recogniser" in out


def test_normal_features_none_leaves_the_guidance_to_the_backend_and_a_bad_file_is_named(
    scan_file, tmp_path, capsys
):
    guidance = ("--guidance", "sharp ridges are normal")
    assert run(scan_file, "--out", tmp_path, "--no-render", *guidance, "--normal-features", "none") == 0
    report, _ = outputs(tmp_path)
    assert "normal_features" not in report["guidance"] and "curvature" in report["guidance"]["applied"]
    bad = tmp_path / "recognisers.json"
    bad.write_text('{"format": "scanagent-normal-features", "kinds": {"edges": {"features": ["a"]}}}')
    out = tmp_path / "bad"
    assert run(scan_file, "--out", out, "--no-render", *guidance, "--normal-features", bad) == 2
    said = capsys.readouterr()
    said = said.out + said.err
    assert str(bad) in said and "malformed" in said and "Traceback" not in said
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_guidance_the_policy_reads_no_intent_in_is_reported_as_not_used(scan_file, tmp_path, capsys):
    assert run(scan_file, "--out", tmp_path, "--no-render", "--guidance", "the weather is nice today") == 0
    report, _ = outputs(tmp_path)
    assert report["guidance"]["used"] is False and "read no intent" in report["guidance"]["note"]
    assert "guidance not used" in capsys.readouterr().out


def test_a_backend_that_reads_guidance_is_reported_as_using_it(scan_file, tmp_path):
    pytest.importorskip("langchain_core")
    assert (
        run(
            scan_file,
            "--out",
            tmp_path,
            "--no-render",
            "--backend",
            "langchain",
            "--guidance",
            "rims are normal",
            "--model",
            "tests.test_faults_backend:ReportingChatModel",
        )
        == 0
    )
    report, _ = outputs(tmp_path)
    assert report["guidance"]["used"] is True and report["guidance"]["note"] is None


def test_a_local_generation_past_its_time_runs_no_further_forward_pass():
    """The hf backend is told the time left: a generation the loop gave up on stops at its next token instead
    of
    competing with the fallback for the CPU (checked on the decoder, without loading a model)."""
    import time

    from agent.backends.hf_backend import HFBackend
    from agent.backends.hf_decoder import Decoder

    assert HFBackend.accepts_seconds_left
    decoder = Decoder(model=None, tokenizer=None, torch=None, deadline=time.monotonic() - 1.0)
    with pytest.raises(TimeoutError, match="time limit"):
        decoder._forward([1, 2, 3])
