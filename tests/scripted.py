"""A scripted fake LLM for tests only: replays a fixed list of replies (or raises) so every loop path is reachable.

Each script step is an `LLMReply`, an exception instance (raised from `chat`), or a callable
`(messages, tools) -> LLMReply` for replies that depend on the conversation so far.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from agent.backends.base import LLMReply, ToolCall, Usage

ScriptStep = LLMReply | BaseException | Callable[[list[dict], list[dict]], LLMReply]


class ScriptedBackend:
    name = "scripted"
    uses_guidance = False  # it replays its script

    def __init__(self, steps: Sequence[ScriptStep], *, repeat_last: bool = False):
        if not steps:
            raise ValueError("ScriptedBackend needs at least one step")
        self.steps = list(steps)
        self.repeat_last = repeat_last
        self.calls: list[list[dict]] = []  # the messages seen by each chat call (deep copies)

    def chat(self, messages: list[dict], tools: list[dict]) -> LLMReply:
        index = len(self.calls)
        self.calls.append(copy.deepcopy(messages))
        if index >= len(self.steps):
            if not self.repeat_last:
                raise RuntimeError(f"ScriptedBackend ran out of steps after {len(self.steps)} calls")
            index = len(self.steps) - 1
        step = self.steps[index]
        if isinstance(step, BaseException):
            raise step
        if callable(step) and not isinstance(step, LLMReply):
            return step(messages, tools)
        return step.model_copy(deep=True)


def call(name: str, arguments: str, call_id: str = "call_0", tokens: int = 5) -> LLMReply:
    """A reply holding one tool call (test helper)."""
    return LLMReply(
        text=None,
        tool_calls=[ToolCall(id=call_id, name=name, arguments=arguments)],
        usage=Usage(prompt_tokens=10, completion_tokens=tokens),
    )


def text(content: str) -> LLMReply:
    """A reply with text only (test helper)."""
    return LLMReply(text=content, tool_calls=[], usage=Usage(prompt_tokens=10, completion_tokens=3))
