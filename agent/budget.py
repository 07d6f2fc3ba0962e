"""What an agent attempt may spend, and how big a request is: the budget and the context-window arithmetic.

Why apart from the loop: the loop decides what to do when a limit is near; this module only says how many
tokens a request is likely to take and which window applies, so the arithmetic can be read (and changed) on
its own.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

from agent.backends.base import Backend

CHARS_PER_TOKEN_GUESS = 3.0  # the first request only, before a reply has said how many tokens a prompt takes
MESSAGE_OVERHEAD_TOKENS = 8  # chat-template tokens around each message (role markers, separators)
DEFAULT_REPLY_RESERVE = 512  # tokens kept free for the reply when the backend does not say its limit


class AgentBudget(BaseModel):
    """What one backend's attempt at a scan may spend before the fallback takes over."""

    max_turns: int = Field(8, ge=1)  # backend.chat calls
    max_tool_calls: int = Field(16, ge=1)
    max_total_tokens: int = Field(60_000, ge=1)  # prompt + completion tokens summed over turns
    max_repairs: int = Field(1, ge=0)  # repair prompts before the fallback takes over
    # Wall time of one backend's attempt at a scan (every request and retry in it). A request still unanswered
    # when it runs out is abandoned (a backend with `accepts_seconds_left` is also told, so its own requests
    # stop then) and the fallback finishes the scan: a hung server costs this, not its timeout times its
    # retries times the turns.
    max_seconds: float | None = Field(None, gt=0)
    # The model's context window in tokens (None: the backend's own `context_window`, if it declares one).
    # Before a request that would not fit, the model is asked once to report now with only report_suspects on
    # offer; if even that cannot fit, the fallback runs. Without this a small local model's conversation
    # outgrows its window and every later turn is wasted (or the server rejects it).
    max_context_tokens: int | None = Field(None, ge=256)


def request_chars(messages: list[dict], tools: list[dict]) -> int:
    """Characters of a request as JSON: a stable proxy for its prompt tokens (the chat template adds a few per
    turn)."""
    return len(json.dumps(messages, ensure_ascii=False, default=str)) + len(
        json.dumps(tools, ensure_ascii=False)
    )


def message_chars(message: dict) -> int:
    """Characters of a message's text and of its tool calls' names and arguments."""
    calls = message.get("tool_calls") or []
    return len(str(message.get("content") or "")) + sum(
        len(c.get("function", {}).get("name", "")) + len(c.get("function", {}).get("arguments", ""))
        for c in calls
    )


def context_window(backend: Backend, budget: AgentBudget) -> int | None:
    """The smaller of the budget's window and the backend's declared `context_window`; None when neither is
    known, and None for a backend that reads the conversation as data, not tokens (`tokenizes = False`: the
    policy)."""
    if getattr(backend, "tokenizes", True) is False:
        return None
    known = [
        w
        for w in (budget.max_context_tokens, getattr(backend, "context_window", None))
        if isinstance(w, int) and w > 0
    ]
    return min(known) if known else None


def reply_reserve(backend: Backend) -> int:
    """Tokens the reply may take: the backend's own limit (max_tokens or max_new_tokens) when it has one."""
    for name in ("max_tokens", "max_new_tokens"):
        value = getattr(backend, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_REPLY_RESERVE
