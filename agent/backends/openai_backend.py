"""Any OpenAI-compatible chat server (OpenAI, vLLM, llama.cpp server, Ollama) through the openai SDK.

Why our own retry loop instead of the SDK's: the backoff base must be configurable (tests use milliseconds, real runs
seconds) and bounded, and every attempt should be countable. The SDK's own retries are switched off (max_retries=0).
Retried: HTTP 429, HTTP 5xx, connection errors and timeouts. Not retried: other 4xx (a bad request stays bad).

The API key comes from the argument or OPENAI_API_KEY; a local `base_url` without one gets a dummy key. The key is never
logged and never part of repr().
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from urllib.parse import urlparse

from agent.backends.base import BackendUnavailable, LLMReply, ToolCall, Usage, llama_cpp_compatible, sole_tool

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
DUMMY_KEY = "sk-local-no-key"


class OpenAIBackend:
    name = "openai"

    def __init__(self, model: str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 4, backoff_base: float = 0.5, backoff_max: float = 8.0,
                 temperature: float = 0.0, max_tokens: int | None = 512, tool_choice: str | dict = "auto",
                 seed: int | None = 0, probe: bool = True, llama_cpp_compat: bool = False,
                 context_window: int | None = None, sleep: Callable[[float], None] = time.sleep):
        try:
            import openai
        except ImportError as err:
            raise BackendUnavailable(f"openai backend needs the openai package: {err}") from err
        if max_retries < 0 or backoff_base < 0 or timeout <= 0:
            raise ValueError("max_retries and backoff_base must be >= 0 and timeout > 0")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if base_url and urlparse(base_url).hostname in LOCAL_HOSTS:
                key = DUMMY_KEY
            else:
                raise BackendUnavailable("openai backend: set OPENAI_API_KEY (or give base_url of a local server)")
        self._openai = openai
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        self.base_url = base_url
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
        self._sleep = sleep
        self.model = model
        if probe or model is None:
            self.model = self._probe(model)

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"

    def _probe(self, model: str | None) -> str:
        """Check the server answers (BackendUnavailable otherwise) and pick its first model when none was named."""
        try:
            listed = self._with_retries(lambda: self._client.models.list())
            ids = [m.id for m in listed.data]
        except self._openai.OpenAIError as err:
            raise BackendUnavailable(f"openai backend: server {self.base_url or 'api.openai.com'} unusable: "
                                     f"{type(err).__name__}: {err}") from err
        if model is not None:
            return model
        if not ids:
            raise BackendUnavailable(f"openai backend: server {self.base_url} lists no models")
        return ids[0]

    def _retryable(self, err: Exception) -> bool:
        o = self._openai
        if isinstance(err, (o.APIConnectionError, o.RateLimitError, o.InternalServerError)):  # timeouts included
            return True
        return isinstance(err, o.APIStatusError) and (err.status_code == 429 or err.status_code >= 500)

    def _with_retries(self, request: Callable[[], object]):
        for attempt in range(self.max_retries + 1):
            self.attempts += 1
            try:
                return request()
            except self._openai.OpenAIError as err:
                if attempt >= self.max_retries or not self._retryable(err):
                    raise
                self._sleep(min(self.backoff_max, self.backoff_base * 2**attempt))
        raise AssertionError("unreachable")

    def chat(self, messages: list[dict], tools: list[dict]) -> LLMReply:
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
        response = self._with_retries(lambda: self._client.chat.completions.create(**kwargs))
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
