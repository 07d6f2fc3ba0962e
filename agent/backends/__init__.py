"""Backends behind one registry: `get_backend("openai" | "langchain" | "hf" | "policy", **kwargs)`.

Factories import their backend module only when called, so importing the registry never pulls in openai,
langchain or
torch; a backend whose package is missing raises `BackendUnavailable` when it is asked for, not before.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.backends.base import Backend, BackendUnavailable, LLMReply, ToolCall, Usage


def _openai(**kwargs) -> Backend:
    from agent.backends.openai_backend import OpenAIBackend

    return OpenAIBackend(**kwargs)


def _langchain(**kwargs) -> Backend:
    from agent.backends.langchain_backend import LangChainBackend

    return LangChainBackend(**kwargs)


def _hf(**kwargs) -> Backend:
    from agent.backends.hf_backend import HFBackend

    return HFBackend(**kwargs)


def _policy(**kwargs) -> Backend:
    from agent.backends.policy import PolicyBackend

    return PolicyBackend(**kwargs)


def _ranker(**kwargs) -> Backend:
    from agent.backends.ranker import RankerBackend

    return RankerBackend(**kwargs)


def _random_regions(**kwargs) -> Backend:
    from agent.backends.random_regions import RandomRegionsBackend

    return RandomRegionsBackend(**kwargs)


REGISTRY: dict[str, Callable[..., Backend]] = {
    "openai": _openai,
    "langchain": _langchain,
    "hf": _hf,
    "policy": _policy,
    "random-regions": _random_regions,
    "ranker": _ranker,
}


def get_backend(name: str, **kwargs) -> Backend:
    """A ready backend; unknown names raise ValueError listing the known ones, unusable ones
    BackendUnavailable."""
    try:
        factory = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    return factory(**kwargs)


__all__ = ["REGISTRY", "Backend", "BackendUnavailable", "LLMReply", "ToolCall", "Usage", "get_backend"]
