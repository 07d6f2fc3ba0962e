"""The one interface every LLM backend implements.

A backend sees only OpenAI-format messages and OpenAI tool schemas and answers with text or tool calls.
Keeping the
interface this small (like lm-evaluation-harness's model registry) means the agent loop never branches on
which model is
behind it, and the deterministic policy backend can stand in for any LLM.

Nothing here imports numpy, open3d or torch: the agent package must stay importable on a machine without them.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field


class BackendUnavailable(RuntimeError):
    """The backend cannot start: missing package, unreachable server, missing model file. `agent.run` exits
    3."""


class ToolCall(BaseModel):
    """One tool call as the model produced it. `arguments` stays the raw JSON text so the loop can see
    malformed JSON."""

    id: str
    name: str
    arguments: str


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class LLMReply(BaseModel):
    """What one `chat` call returns.

    `raw` is optional and only for transcripts: the exact text a local model generated (for the hf backend
    this includes
    the tool-call JSON it produced), so a reader can check that real tokens were generated.
    """

    text: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    raw: str | None = None

    def to_message(self) -> dict[str, Any]:
        """The OpenAI-format assistant message for this reply (what the loop appends to the conversation)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return message


@runtime_checkable
class Backend(Protocol):
    name: str

    def chat(self, messages: list[dict], tools: list[dict]) -> LLMReply: ...


def recorded_count(value: object, source: str, name: str) -> int | None:
    """A row or id count read from a trained model's file (an adapter recipe, a ranker model): None when the
    file predates it, else a positive integer; anything else is refused, naming the file and the field."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {name} must be a positive integer, got {value!r}")
    return value


def sole_tool(tools: list[dict], configured: Any) -> str | None:
    """The tool's name when exactly one tool is offered under tool_choice "auto", else None.

    The loop offers one tool only for its finish turn (report_suspects, when the context window is nearly
    full). A
    model asked to choose freely then often writes the call as text -- SmolLM2 behind llama.cpp answered
    "functions.report_suspects:" -- so the backends name the tool and the server constrains the reply to its
    call."""
    if configured == "auto" and len(tools) == 1:
        return str(tools[0]["function"]["name"])
    return None


def tool_names(tools: list[dict]) -> list[str]:
    """Names of OpenAI tool schemas, in order."""
    return [t["function"]["name"] for t in tools]


def tool_call_names(messages: list[dict]) -> dict[str, str]:
    """Map tool_call_id -> tool name over the assistant messages, so a `role: tool` message can be
    attributed."""
    names: dict[str, str] = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
    return names


def parse_json_object(text: str) -> dict | None:
    """`text` as a JSON object, or None when it is not one (tool results may be plain text errors)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def llama_cpp_compatible(messages: list[dict]) -> list[dict]:
    """Messages a llama-cpp-python server accepts and shows to the model.

    Its chatml-function-calling template renders only system/user/assistant turns, so `role: tool` results are
    re-sent
    as user turns ("Result of <tool>: ...") or the model would never see them. Its request schema rejects
    `content: null`, which clients send for assistant turns that only call tools, so earlier tool calls are
    sent as
    assistant text in the template's own syntax ("functions.<name>:\n<arguments>").
    """
    names = tool_call_names(messages)
    out = []
    for m in messages:
        if m.get("role") == "tool":
            name = names.get(m.get("tool_call_id", ""), "tool")
            out.append({"role": "user", "content": f"Result of {name}: {m.get('content') or ''}"})
        elif m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "".join(
                f"functions.{c['function']['name']}:\n{c['function']['arguments']}\n" for c in m["tool_calls"]
            )
            out.append({"role": "assistant", "content": (m.get("content") or "") + calls})
        elif m.get("content") is None:
            out.append({**m, "content": ""})
        else:
            out.append(m)
    return out
