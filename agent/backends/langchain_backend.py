"""Any LangChain chat model, named as `module:Class` plus keyword arguments (e.g. `langchain_openai:ChatOpenAI`).

Why: LangChain already wraps many providers (Anthropic, Bedrock, Ollama, ...); this backend lets any of them drive the
same loop. Messages go to and from langchain-core message objects; tools are bound with `bind_tools` from the same
OpenAI schemas; usage comes from `usage_metadata`. A tool call whose arguments LangChain could not parse arrives as an
`invalid_tool_call` and is passed on with its raw text, so the loop's repair path sees the malformed JSON.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from agent.backends.base import BackendUnavailable, LLMReply, ToolCall, Usage, llama_cpp_compatible, sole_tool
from agent.secrets import secrets_in


def load_chat_model(spec: str, kwargs: dict[str, Any]) -> Any:
    """Instantiate `module:Class(**kwargs)`; a missing module or class raises BackendUnavailable."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"langchain model must be given as 'module:Class', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendUnavailable(f"langchain backend: cannot import {module_name}: {err}") from err
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise BackendUnavailable(f"langchain backend: {module_name} has no {class_name}") from None
    return cls(**kwargs)


def to_langchain(messages: list[dict]) -> list[Any]:
    """OpenAI-format messages -> langchain-core messages."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    converted: list[Any] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "system":
            converted.append(SystemMessage(content=content))
        elif role == "user":
            converted.append(HumanMessage(content=content))
        elif role == "tool":
            converted.append(ToolMessage(content=content, tool_call_id=m["tool_call_id"]))
        elif role == "assistant":
            good, bad = [], []
            for call in m.get("tool_calls") or []:
                fn = call["function"]
                try:
                    args = json.loads(fn["arguments"] or "{}")
                except json.JSONDecodeError:
                    args = None
                if isinstance(args, dict):
                    good.append({"name": fn["name"], "args": args, "id": call["id"], "type": "tool_call"})
                else:
                    bad.append({"name": fn["name"], "args": fn["arguments"], "id": call["id"],
                                "error": "arguments are not a JSON object", "type": "invalid_tool_call"})
            converted.append(AIMessage(content=content, tool_calls=good, invalid_tool_calls=bad))
        else:
            raise ValueError(f"message with unknown role {role!r}")
    return converted


def from_langchain(message: Any) -> LLMReply:
    """A langchain AIMessage -> LLMReply."""
    calls = [
        ToolCall(id=c.get("id") or f"call_{i}", name=c["name"], arguments=json.dumps(c.get("args") or {}))
        for i, c in enumerate(getattr(message, "tool_calls", None) or [])
    ]
    for i, c in enumerate(getattr(message, "invalid_tool_calls", None) or [], start=len(calls)):
        calls.append(ToolCall(id=c.get("id") or f"call_{i}", name=c.get("name") or "", arguments=c.get("args") or ""))
    meta = getattr(message, "usage_metadata", None) or {}
    usage = Usage(prompt_tokens=meta.get("input_tokens", 0) or 0, completion_tokens=meta.get("output_tokens", 0) or 0)
    content = message.content
    if isinstance(content, list):  # content blocks: keep the text ones
        content = "".join(b if isinstance(b, str) else b.get("text", "") for b in content)
    return LLMReply(text=content or None, tool_calls=calls, usage=usage)


class LangChainBackend:
    name = "langchain"
    uses_guidance = True  # the guidance is part of the prompt the model reads

    def __init__(self, chat_model: str | Any = "langchain_openai:ChatOpenAI", *, tool_choice: str | None = "auto",
                 llama_cpp_compat: bool = False, context_window: int | None = None, **model_kwargs: Any):
        """`chat_model` is `module:Class` (instantiated with `model_kwargs`, e.g. model=..., base_url=...) or a ready
        LangChain chat model object."""
        try:
            import langchain_core  # noqa: F401
        except ImportError as err:
            raise BackendUnavailable(f"langchain backend needs the langchain extra (pip install 'scanagent[langchain]'): "
                                      f"{err}") from err
        self.secrets = tuple(secrets_in(model_kwargs))  # e.g. api_key=...: scrubbed from everything the run writes
        self.chat_model = load_chat_model(chat_model, model_kwargs) if isinstance(chat_model, str) else chat_model
        self.tool_choice = tool_choice
        self.llama_cpp_compat = llama_cpp_compat  # see base.llama_cpp_compatible
        self.context_window = context_window  # the model's window in tokens; the loop keeps within it
        self._bound: dict[str, Any] = {}

    def chat(self, messages: list[dict], tools: list[dict]) -> LLMReply:
        runnable = self.chat_model
        if tools:
            key = json.dumps(tools, sort_keys=True)
            if key not in self._bound:
                choice = sole_tool(tools, self.tool_choice) or self.tool_choice
                kwargs = {"tool_choice": choice} if choice else {}
                self._bound[key] = self.chat_model.bind_tools(tools, **kwargs)
            runnable = self._bound[key]
        sent = llama_cpp_compatible(messages) if self.llama_cpp_compat else messages
        return from_langchain(runnable.invoke(to_langchain(sent)))
