"""Backends without a real model: the registry, the openai backend's retries against a local fake server,
LangChain
message conversion, and the pure helpers of the hf backend."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import pytest

from agent.backends import REGISTRY, BackendUnavailable, get_backend
from agent.backends.base import LLMReply, ToolCall
from agent.backends.hf_backend import HFBackend, parse_free_tool_call
from agent.loop import run_agent

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "list_patches",
            "description": "list",
            "parameters": {"type": "object", "properties": {"top_k": {"type": "integer"}}},
        },
    }
]
MESSAGES = [{"role": "user", "content": "find defects"}]


def completion(
    tool_name: str | None = "list_patches", arguments: str = '{"top_k": 3}', content: str | None = None
):
    message: dict = {"role": "assistant", "content": content}
    if tool_name:
        message["tool_calls"] = [
            {"id": "call_1", "type": "function", "function": {"name": tool_name, "arguments": arguments}}
        ]
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "finish_reason": "tool_calls" if tool_name else "stop", "message": message}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }


class FakeOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 that answers chat requests from a script of (status, body)."""

    def __init__(self, script: list[tuple[int, dict]]):
        self.script = list(script)
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "test"}],
                    },
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.auth_headers.append(self.headers.get("Authorization", ""))
                status, reply = (
                    outer.script.pop(0) if outer.script else (500, {"error": {"message": "no script"}})
                )
                self._send(status, reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


ERROR = {"error": {"message": "slow down", "type": "rate_limit"}}


def openai_backend(url: str, **kwargs):
    return get_backend("openai", base_url=url, backoff_base=0.001, timeout=5, **kwargs)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The waits of the openai SDK's retry loop (it sleeps through time.sleep), recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr("openai._base_client.time.sleep", waits.append)
    return waits


# ---- registry
# -----------------------------------------------------------------------------------------------------
def test_registry_names_and_unknown_backend():
    assert {"openai", "langchain", "hf", "policy"} <= set(REGISTRY)
    with pytest.raises(ValueError, match="unknown backend 'gpt'.*hf"):
        get_backend("gpt")
    assert get_backend("policy", target_share=0.2).target_share == 0.2


def test_backends_do_not_import_heavy_packages_at_module_level():
    code = (
        "import sys, agent.backends, agent.backends.hf_backend, agent.backends.openai_backend, "
        "agent.backends.langchain_backend, agent.backends.policy, agent.loop, agent.transcript\n"
        "heavy = {'torch', 'numpy', 'open3d', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1])
    )


# ---- openai
# -------------------------------------------------------------------------------------------------------
def test_openai_retries_429_and_5xx_with_exponential_backoff(monkeypatch, sleeps):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAIServer([(429, ERROR), (503, ERROR), (502, ERROR), (200, completion())]) as server:
        backend = openai_backend(server.url)
        reply = backend.chat(MESSAGES, TOOLS)
    assert backend.model == "fake-model"  # picked from /v1/models
    assert reply.tool_calls == [ToolCall(id="call_1", name="list_patches", arguments='{"top_k": 3}')]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (12, 7)
    assert sleeps == pytest.approx([0.001, 0.002, 0.004])
    assert len(server.requests) == 4 and backend.attempts == 5  # the probe's GET and four POSTs
    sent = server.requests[-1]
    assert sent["tools"] == TOOLS and sent["messages"] == MESSAGES
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "list_patches"}}  # the only tool


def test_openai_retries_are_bounded_and_client_errors_not_retried(monkeypatch, sleeps):
    import openai

    with FakeOpenAIServer([(500, ERROR)] * 10) as server:
        backend = openai_backend(server.url, max_retries=2)
        with pytest.raises(openai.InternalServerError):
            backend.chat(MESSAGES, TOOLS)
        assert len(server.requests) == 3 and len(sleeps) == 2
    with FakeOpenAIServer([(400, {"error": {"message": "bad request"}}), (200, completion())]) as server:
        backend = openai_backend(server.url)
        with pytest.raises(openai.BadRequestError):
            backend.chat(MESSAGES, TOOLS)
        assert len(server.requests) == 1


def test_openai_unreachable_server_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendUnavailable, match="unusable"):
        get_backend(
            "openai", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base=0.001, timeout=2
        )


def test_openai_needs_a_key_for_a_remote_server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(BackendUnavailable, match="OPENAI_API_KEY"):
        get_backend("openai", base_url="https://api.example.invalid/v1", probe=False, model="m")


def test_openai_key_is_sent_but_never_shown(monkeypatch):
    secret = "sk-test-secret-value-123456"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with FakeOpenAIServer([(200, completion())]) as server:
        backend = openai_backend(server.url)
        backend.chat(MESSAGES, TOOLS)
    assert server.auth_headers == [f"Bearer {secret}"]
    assert secret not in repr(backend) and secret not in str(vars(backend).get("base_url"))


def test_openai_backend_drives_the_loop(monkeypatch):
    from test_loop import TASK, VALID_REPORT, FakeToolBox

    from agent.backends.policy import PolicyBackend

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    script = [
        (200, completion("list_patches", '{"top_k": 4}')),
        (200, completion("report_suspects", VALID_REPORT)),
    ]
    with FakeOpenAIServer(script) as server:
        outcome = run_agent(openai_backend(server.url), FakeToolBox(), TASK, fallback=PolicyBackend())
    assert not outcome.fallback_used and outcome.regions[0]["patch_ids"] == [1, 3]
    second = server.requests[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "list_patches"
    assert second[-1]["role"] == "tool" and json.loads(second[-1]["content"])["patches"][0]["id"] == 1
    assert outcome.usage.completion_tokens == 14


def test_openai_names_the_tool_when_only_one_is_offered(monkeypatch):
    """The loop's finish turn offers only report_suspects: the request must then name it (servers such as
    llama.cpp
    constrain the reply to that call), while a choice of tools stays "auto"."""
    from test_loop import FakeToolBox

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tools = FakeToolBox().openai_schemas()
    with FakeOpenAIServer([(200, completion()), (200, completion())]) as server:
        backend = openai_backend(server.url)
        backend.chat([{"role": "user", "content": "go"}], tools)
        backend.chat(
            [{"role": "user", "content": "go"}],
            [t for t in tools if t["function"]["name"] == "report_suspects"],
        )
    assert server.requests[0]["tool_choice"] == "auto"
    assert server.requests[1]["tool_choice"] == {"type": "function", "function": {"name": "report_suspects"}}


# ---- langchain
# ----------------------------------------------------------------------------------------------------
def test_langchain_message_conversion_round_trip():
    from agent.backends.langchain_backend import from_langchain, to_langchain

    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "list_patches", "arguments": '{"top_k": 2}'},
                },
                {
                    "id": "b",
                    "type": "function",
                    "function": {"name": "neighbourhood", "arguments": "{broken"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "{}"},
        {"role": "tool", "tool_call_id": "b", "content": "error: bad json"},
    ]
    converted = to_langchain(messages)
    assert [type(m).__name__ for m in converted] == [
        "SystemMessage",
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "ToolMessage",
    ]
    ai = converted[2]
    assert ai.tool_calls[0]["args"] == {"top_k": 2} and ai.invalid_tool_calls[0]["args"] == "{broken"
    reply = from_langchain(ai)
    assert [(c.id, c.name) for c in reply.tool_calls] == [("a", "list_patches"), ("b", "neighbourhood")]
    assert json.loads(reply.tool_calls[0].arguments) == {"top_k": 2}
    assert reply.tool_calls[1].arguments == "{broken"  # the loop will see the malformed JSON and repair it


def test_langchain_chat_openai_against_the_fake_server(monkeypatch):
    pytest.importorskip("langchain_openai")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAIServer([(200, completion("list_patches", '{"top_k": 5}'))]) as server:
        backend = get_backend(
            "langchain",
            chat_model="langchain_openai:ChatOpenAI",
            base_url=server.url,
            api_key="not-a-real-key",
            model="fake-model",
            max_retries=0,
            temperature=0,
        )
        reply = backend.chat(MESSAGES, TOOLS)
    assert reply.tool_calls[0].name == "list_patches" and json.loads(reply.tool_calls[0].arguments) == {
        "top_k": 5
    }
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (12, 7)
    assert server.requests[0]["tools"][0]["function"]["name"] == "list_patches"


def test_langchain_bad_model_spec():
    with pytest.raises(BackendUnavailable, match="no_such_module"):
        get_backend("langchain", chat_model="no_such_module:Chat")
    with pytest.raises(ValueError, match="module:Class"):
        get_backend("langchain", chat_model="ChatOpenAI")


# ---- hf helpers (no model)
# ----------------------------------------------------------------------------------------
def test_free_text_tool_call_parsing():
    good = parse_free_tool_call(
        '<tool_call>\n{"name": "list_patches", "arguments": {"top_k": 3}}\n</tool_call>', "x"
    )
    assert good == ToolCall(id="x", name="list_patches", arguments='{"top_k": 3}')
    broken = parse_free_tool_call(
        '{"name": "neighbourhood", "arguments": {"patch_id": 3,,}}</tool_call>', "y"
    )
    assert broken is not None and broken.name == "neighbourhood"
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.arguments)
    assert parse_free_tool_call("The scan looks fine to me.", "z") is None


def test_number_clamping_respects_schema_bounds():
    assert HFBackend._clamp_number("7", {"minimum": 0, "maximum": 1}, "number") == "1"
    assert HFBackend._clamp_number("999", {"minimum": 1, "maximum": 50}, "integer") == "50"
    assert HFBackend._clamp_number("", {"default": 10}, "integer") == "10"
    assert float(HFBackend._clamp_number("0", {"exclusiveMinimum": 0, "maximum": 2}, "number")) > 0


@pytest.mark.slow
def test_hf_missing_model_file_is_unavailable(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(BackendUnavailable, match="does not exist"):
        get_backend("hf", model=str(tmp_path / "missing.gguf"))
    with pytest.raises(BackendUnavailable, match="config.json"):
        get_backend("hf", model=str(tmp_path))


def test_llm_reply_to_message():
    reply = LLMReply(text=None, tool_calls=[ToolCall(id="c", name="t", arguments="{}")])
    assert reply.to_message() == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "t", "arguments": "{}"}}],
    }


def test_llama_cpp_compatible_messages():
    from agent.backends.base import llama_cpp_compatible

    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "list_patches", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": '{"patches": []}'},
    ]
    folded = llama_cpp_compatible(messages)
    assert folded[0] == messages[0]
    assert folded[1] == {"role": "assistant", "content": "functions.list_patches:\n{}\n"}
    assert folded[2] == {"role": "user", "content": 'Result of list_patches: {"patches": []}'}
