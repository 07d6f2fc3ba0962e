"""Any OpenAI-compatible chat server (OpenAI, vLLM, llama.cpp server, Ollama) through the openai SDK.

Retries are the SDK's own (`max_retries`, per-attempt `timeout`): it retries connection errors, timeouts, 408, 409, 429
and 5xx and honours a server's Retry-After; other 4xx are not retried (a bad request stays bad). Two things are ours:
the exponential backoff between attempts without a Retry-After is `backoff_base * 2**n` capped at `backoff_max` (tests
use milliseconds, real runs seconds), and a call given `seconds_left` (the loop's per-scan time budget) ends by then:
every attempt's timeouts are cut to the time left, no wait outlasts it, and no attempt starts after it, so a hung
server costs the budget, not `(max_retries + 1) x timeout`.

The API key comes from the argument or OPENAI_API_KEY; a local `base_url` without one gets a dummy key. The key is never
logged, never part of repr(), scrubbed from this backend's own error messages and declared in `secrets`, so that every
writer of the run scrubs it too.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from typing import Any
from urllib.parse import urlparse

from agent.backends.base import BackendUnavailable, LLMReply, ToolCall, Usage, llama_cpp_compatible, sole_tool
from agent.secrets import Redactor

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
DUMMY_KEY = "sk-local-no-key"


@functools.cache
def _client_class(openai: Any) -> type:
    """The SDK's client with our backoff and a per-thread deadline on its waits (the SDK's one backoff hook,
    `_calculate_retry_timeout`; should a later SDK drop it, its own backoff applies and the deadline still holds
    through the request hook)."""

    class Client(openai.OpenAI):
        backoff_base: float = 0.5
        backoff_max: float = 8.0
        deadlines: threading.local

        def _calculate_retry_timeout(self, remaining_retries: int, options: Any, response_headers: Any = None) -> float:
            if self._parse_retry_after_header(response_headers) is not None:
                wait = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
            else:
                attempt = options.get_max_retries(self.max_retries) - remaining_retries
                wait = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt, 60))
            deadline = getattr(self.deadlines, "at", None)
            return wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic()))

    return Client


class OpenAIBackend:
    name = "openai"
    uses_guidance = True        # the guidance is part of the prompt the model reads
    accepts_seconds_left = True  # chat(..., seconds_left=) ends by then (the loop's time budget)

    def __init__(self, model: str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 4, backoff_base: float = 0.5, backoff_max: float = 8.0,
                 temperature: float = 0.0, max_tokens: int | None = 512, tool_choice: str | dict = "auto",
                 seed: int | None = 0, probe: bool = True, llama_cpp_compat: bool = False,
                 context_window: int | None = None):
        try:
            import openai
        except ImportError as err:
            raise BackendUnavailable(f"openai backend needs the openai package: {err}") from err
        if not isinstance(max_retries, int) or max_retries < 0 or backoff_base < 0 or backoff_max < 0 or timeout <= 0:
            raise ValueError("max_retries (an integer), backoff_base and backoff_max must be >= 0 and timeout > 0")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if base_url and urlparse(base_url).hostname in LOCAL_HOSTS:
                key = DUMMY_KEY
            else:
                raise BackendUnavailable("openai backend: set OPENAI_API_KEY (or give base_url of a local server)")
        self.secrets: tuple[str, ...] = () if key == DUMMY_KEY else (key,)
        self._redact = Redactor.for_run(self.secrets)
        self._openai = openai
        self._deadlines = threading.local()
        client_class = _client_class(openai)
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._before_attempt]})
        self._client = client_class(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries,
                                    http_client=http_client)
        self._client.backoff_base, self._client.backoff_max = backoff_base, backoff_max
        self._client.deadlines = self._deadlines
        self.base_url = base_url
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.tool_choice = tool_choice
        self.seed = seed
        self.llama_cpp_compat = llama_cpp_compat  # see base.llama_cpp_compatible
        self.context_window = context_window  # the server's window (e.g. llama.cpp --n_ctx); the loop keeps within it
        self.attempts = 0  # HTTP attempts made, retries included (for tests and reports)
        self.model = model
        if probe or model is None:
            self.model = self._probe(model)

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"

    def _before_attempt(self, request: Any) -> None:
        """Every HTTP attempt, retries included: count it, and within a call's deadline cut its timeouts to the time
        left or refuse it (APITimeoutError, which the SDK does not retry) once none is left."""
        self.attempts += 1
        deadline = getattr(self._deadlines, "at", None)
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._openai.APITimeoutError(request=request)
        limits = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            phase: min(left, math.inf if limits.get(phase) is None else limits[phase])
            for phase in ("connect", "read", "write", "pool")}

    def _probe(self, model: str | None) -> str:
        """Check the server answers (BackendUnavailable otherwise) and pick its first model when none was named."""
        try:
            ids = [m.id for m in self._client.models.list().data]
        except self._openai.OpenAIError as err:
            raise BackendUnavailable(self._redact.text(f"openai backend: server {self.base_url or 'api.openai.com'} "
                                                       f"unusable: {type(err).__name__}: {err}")) from None
        if model is not None:
            return model
        if not ids:
            raise BackendUnavailable(f"openai backend: server {self.base_url} lists no models")
        return ids[0]

    def chat(self, messages: list[dict], tools: list[dict], *, seconds_left: float | None = None) -> LLMReply:
        """One completion; with `seconds_left` every attempt, wait and retry ends within that many seconds."""
        sent = llama_cpp_compatible(messages) if self.llama_cpp_compat else messages
        kwargs: dict = {"model": self.model, "messages": sent, "temperature": self.temperature}
        if tools:
            only = sole_tool(tools, self.tool_choice)
            choice = {"type": "function", "function": {"name": only}} if only else self.tool_choice
            kwargs.update(tools=tools, tool_choice=choice)
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.seed is not None:
            kwargs["seed"] = self.seed
        self._deadlines.at = None if seconds_left is None else time.monotonic() + max(0.0, seconds_left)
        try:
            response = self._client.chat.completions.create(**kwargs)
        finally:
            self._deadlines.at = None
        message = response.choices[0].message
        calls = [
            ToolCall(id=c.id or f"call_{i}", name=c.function.name, arguments=c.function.arguments or "")
            for i, c in enumerate(message.tool_calls or [])
        ]
        usage = Usage()
        if response.usage is not None:
            usage = Usage(prompt_tokens=response.usage.prompt_tokens or 0,
                          completion_tokens=response.usage.completion_tokens or 0)
        return LLMReply(text=message.content, tool_calls=calls, usage=usage)
