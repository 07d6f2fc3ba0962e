"""Backends behind one registry: `get_backend("openai" | "langchain" | "hf" | "policy", **kwargs)`.

Factories import their backend module only when called, so importing the registry never pulls in openai,
langchain or
torch; a backend whose package is missing raises `BackendUnavailable` when it is asked for, not before.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from agent.backends.base import Backend, BackendUnavailable, LLMReply, ToolCall, Usage

# name -> (module, class); a factory imports its module only when called
_CLASSES: dict[str, tuple[str, str]] = {
    "openai": ("agent.backends.openai_backend", "OpenAIBackend"),
    "langchain": ("agent.backends.langchain_backend", "LangChainBackend"),
    "hf": ("agent.backends.hf_backend", "HFBackend"),
    "policy": ("agent.backends.policy", "PolicyBackend"),
    "random-regions": ("agent.backends.random_regions", "RandomRegionsBackend"),
    "ranker": ("agent.backends.ranker", "RankerBackend"),
}


def _backend_class(name: str) -> type:
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def _factory(name: str) -> Callable[..., Backend]:
    def make(**kwargs) -> Backend:
        return _backend_class(name)(**kwargs)

    return make


REGISTRY: dict[str, Callable[..., Backend]] = {name: _factory(name) for name in _CLASSES}


def backend_parameters(name: str) -> list[str] | None:
    """The keyword arguments a registered backend takes, so a misspelt option fails before a run; None when
    its module cannot be imported here (then the backend itself reports what is missing when it starts)."""
    if name not in _CLASSES:
        return None
    try:
        params = list(inspect.signature(_backend_class(name).__init__).parameters.values())
    except ImportError:
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None  # it passes any keyword on (to a chat model): nothing to check here
    return [p.name for p in params if p.name != "self" and p.kind is not p.VAR_POSITIONAL]


def get_backend(name: str, **kwargs) -> Backend:
    """A ready backend; unknown names raise ValueError listing the known ones, unusable ones
    BackendUnavailable."""
    try:
        factory = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    return factory(**kwargs)


__all__ = ["REGISTRY", "Backend", "BackendUnavailable", "LLMReply", "ToolCall", "Usage", "get_backend"]
