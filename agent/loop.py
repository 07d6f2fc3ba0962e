"""The tool-calling loop: ask the backend, run the tools it calls, feed results back, until `report_suspects`.

Why it is shaped like this:
- The conversation is plain OpenAI-format messages, so any backend (API model, local model, the no-LLM policy)
  runs the same loop, and a transcript is a faithful replay.
- Models misbehave (bad JSON, unknown tools, invented patch ids, chatting instead of calling, calling forever,
  timing out). The loop never raises on that: the first problem gets ONE repair prompt that names it; a second
  problem, an exceeded budget or a backend exception hands the task to the fallback backend (the deterministic
  policy), which starts again from the original messages on a fresh toolbox, and the outcome says so
  (`fallback_used`, `fallback_reason`).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, Field

from agent.backends.base import Backend, LLMReply, ToolCall, Usage
from agent.budget import (
    CHARS_PER_TOKEN_GUESS,
    MESSAGE_OVERHEAD_TOKENS,
    AgentBudget,
    context_window,
    message_chars,
    reply_reserve,
    request_chars,
)
from agent.transcript import Transcript
from scans import strict_json

TERMINAL_TOOL = "report_suspects"
FINISH_PROMPT = ("The conversation is about to exceed the model's context window. Call report_suspects now, "
                 "with the regions you suspect from what you have seen so far (an empty list if none).")
# a backend told its time left gets this long past it to return its own timeout error
DEADLINE_GRACE_SECONDS = 1.0


class ToolBoxLike(Protocol):
    """What the loop needs from tools.agent_tools.ToolBox."""

    def openai_schemas(self) -> list[dict]: ...

    def call(self, name: str, arguments: str | dict) -> Any: ...


class AgentOutcome(BaseModel):
    regions: list[dict] = Field(default_factory=list)  # validated report_suspects regions
    fallback_used: bool = False
    fallback_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)  # summed over every turn, the failed LLM attempt included
    n_tool_calls: int = 0  # summed over both attempts when the fallback ran
    turns: int = 0
    error: str | None = None  # set when no report could be made at all
    backend: str = ""  # the backend whose report this is
    repairs: int = 0
    messages: list[dict] = Field(default_factory=list)  # the final conversation of the reporting backend

    @property
    def reported(self) -> bool:
        return self.error is None


class _Stop(Exception):
    """Internal: the current attempt must end and hand over to the fallback."""


def _default_render() -> Callable[[str, dict], str]:
    try:
        from verbalize.render import render_tool_result
    except ImportError:  # verbalize.render not present (minimal installs): compact JSON, the default
        return lambda name, data: strict_json.dumps(data, missing_as_null=True, separators=(",", ":"),
                                              ensure_ascii=False, default=str)
    return render_tool_result


def _result_fields(result: Any) -> tuple[bool, dict, str | None]:
    """(ok, data, error text) of a ToolResult, tolerant of `error` or `content` carrying the message."""
    ok = bool(getattr(result, "ok", False))
    data = getattr(result, "data", None) or {}
    error = getattr(result, "error", None)
    if not ok and not error:
        error = getattr(result, "content", None) or "the tool call failed"
    return ok, data, error


class _Attempt:
    """One backend's run over one conversation. Holds the counters the budget checks."""

    def __init__(self, backend: Backend, toolbox: ToolBoxLike, messages: list[dict], budget: AgentBudget,
                 transcript: Transcript | None, render: Callable[[str, dict], str] | None):
        self.backend = backend
        self.toolbox = toolbox
        self.messages = messages
        self.budget = budget
        self.transcript = transcript
        self.render = render
        self.usage = Usage()
        self.turns = 0
        self.n_tool_calls = 0
        self.repairs = 0
        self.regions: list[dict] | None = None
        self._logged = 0
        self._start = time.perf_counter()
        self.window = context_window(backend, budget)
        # tokens the conversation held at the last reply that reported usage (or the guess)
        self.measured_prompt = 0
        self.measured_upto = 0  # messages[:measured_upto] are inside `measured_prompt` (0: none measured)
        self.largest_result = 0  # characters of the longest tool result so far: room the next one may need
        self.most_calls = 1         # most tool calls in one reply so far: results the next turn may bring
        self.finishing = False      # the finish prompt has been sent

    def log(self, event: str, **fields: Any) -> None:
        if self.transcript is not None:
            self.transcript.log(event, backend=self.backend.name, **fields)

    def run(self) -> None:
        all_tools = self.toolbox.openai_schemas()
        while self.regions is None:
            self._check_budget_before_turn()
            tools = self._tools_that_fit(all_tools)
            allowed = [t["function"]["name"] for t in tools]
            self.turns += 1
            self.log("request", turn=self.turns, messages=self.messages[self._logged:])
            self._logged = len(self.messages)
            sent = len(self.messages)
            # a reply without usage leaves only an upper bound: the request's characters, one token each
            bound = request_chars(self.messages, all_tools) if self.measured_upto == 0 else 0
            started = time.perf_counter()
            try:
                reply = self._chat(copy.deepcopy(self.messages), tools)
            except _Stop:
                raise
            except Exception as err:  # a backend failure of any kind is the fallback's job, not the caller's
                self.log("backend_error", turn=self.turns, error=f"{type(err).__name__}: {err}")
                if self._seconds_left() == 0.0:  # the backend's own timeout at the budget's end: say so
                    raise self._budget(f"max_seconds={self.budget.max_seconds} exceeded while waiting for "
                                       f"the backend ({type(err).__name__}: {err})") from err
                raise _Stop(f"backend error: {type(err).__name__}: {err}") from err
            seconds = time.perf_counter() - started
            self.usage = self.usage + reply.usage
            if reply.usage.prompt_tokens > 0:
                self.measured_prompt = reply.usage.prompt_tokens + reply.usage.completion_tokens
                self.measured_upto = sent + 1  # the reply itself is counted by its completion tokens
            elif self.measured_upto == 0:  # no usage reported: the first request at one token per character
                self.measured_prompt, self.measured_upto = bound, sent
            self.most_calls = max(self.most_calls, len(reply.tool_calls))
            self.log("reply", turn=self.turns, text=reply.text, raw=reply.raw,
                     tool_calls=[c.model_dump() for c in reply.tool_calls], usage=reply.usage.model_dump(),
                     seconds=round(seconds, 4),
                     tokens_per_s=round(reply.usage.completion_tokens / seconds, 2) if seconds > 0 else None)
            self.messages.append(reply.to_message())
            self._logged = len(self.messages)
            self._handle(reply, allowed)
            if self.regions is None and self.usage.total_tokens > self.budget.max_total_tokens:
                raise self._budget(f"max_total_tokens={self.budget.max_total_tokens} exceeded "
                                   f"({self.usage.total_tokens} tokens)")

    def _seconds_left(self) -> float | None:
        """Seconds of `max_seconds` left for this attempt (0.0 once spent), None without a time budget."""
        if self.budget.max_seconds is None:
            return None
        return max(0.0, self.budget.max_seconds - (time.perf_counter() - self._start))

    def _chat(self, messages: list[dict], tools: list[dict]) -> LLMReply:
        """`backend.chat`, and under a time budget no longer than the time left: the call runs in a daemon
        thread that is abandoned when it does not return in time (a blocked socket or a long generation cannot
        be interrupted from outside; a backend that accepts `seconds_left` ends its own requests by then)."""
        left = self._seconds_left()
        if left is None:
            return self.backend.chat(messages, tools)
        kwargs = {"seconds_left": left} if getattr(self.backend, "accepts_seconds_left", False) else {}
        result: dict[str, Any] = {}

        def call() -> None:
            try:
                result["reply"] = self.backend.chat(messages, tools, **kwargs)
            except BaseException as err:  # noqa: BLE001 -- handed to the loop's thread below
                result["error"] = err

        worker = threading.Thread(target=call, name=f"{self.backend.name}-chat", daemon=True)
        worker.start()
        worker.join(left + DEADLINE_GRACE_SECONDS if kwargs else left)
        if worker.is_alive():
            raise self._budget(f"max_seconds={self.budget.max_seconds} exceeded: the backend had not "
                               f"answered after {left:.1f} s")
        if "error" in result:
            raise result["error"]
        return result["reply"]

    def _check_budget_before_turn(self) -> None:
        if self.turns >= self.budget.max_turns:
            raise self._budget(f"max_turns={self.budget.max_turns} reached without {TERMINAL_TOOL}")
        spent = time.perf_counter() - self._start
        if self.budget.max_seconds is not None and spent > self.budget.max_seconds:
            raise self._budget(f"max_seconds={self.budget.max_seconds} exceeded")

    def _tools_that_fit(self, tools: list[dict]) -> list[dict]:
        """All tools while the next request, its reply, the tool results it may bring and a finish prompt all
        fit the context window; else one finish prompt that offers only the terminal tool (sent only if it
        fits); else the fallback. After the finish prompt there is seldom room for a repair prompt: a
        malformed finish reply usually ends with the context-window reason."""
        if self.window is None:
            return tools
        reserve = reply_reserve(self.backend)
        terminal = [t for t in tools if t["function"]["name"] == TERMINAL_TOOL]
        now = self._estimate(tools)
        if self.finishing:
            if now + reserve <= self.window:
                return terminal
        else:
            finish_prompt = len(FINISH_PROMPT) + MESSAGE_OVERHEAD_TOKENS
            # after this turn: its reply (<= reserve), up to most_calls results, the finish prompt, and then
            # the finish turn's own reply reserve
            results = self.most_calls * (self.largest_result + MESSAGE_OVERHEAD_TOKENS)
            after = reserve + MESSAGE_OVERHEAD_TOKENS + results + finish_prompt
            if now + reserve + (after if self.turns > 0 else 0) <= self.window:
                return tools
            finish = now + finish_prompt
            if self.turns > 0 and terminal and finish + reserve <= self.window:
                self.finishing = True
                self.messages.append({"role": "user", "content": FINISH_PROMPT})
                self.log("context_finish", estimated_tokens=finish, window=self.window)
                return terminal
            now = finish if self.turns > 0 else now
        raise self._budget(f"context window of {self.window} tokens: the next request needs about "
                           f"{now + reserve} (reply reserve {reserve} included)")

    def _estimate(self, tools: list[dict]) -> int:
        """An upper estimate of the next request's prompt tokens (the first request excepted).

        The first request: all characters (every tool schema included) at a guessed rate -- not an upper
        bound; a server that finds it too long rejects it and the fallback runs. After that: the tokens the
        conversation held at the last reply that reported usage (else the first request at one token per
        character), plus one token per character of every message added since (tool results are mostly digits
        and punctuation, which many tokenizers split into one token per character) and the chat template's
        per-message overhead. Offering fewer tools is never counted as a saving (servers render tool schemas
        their own way), so `tools` is only used for the first request."""
        if self.measured_upto == 0:
            return int(request_chars(self.messages, tools) / CHARS_PER_TOKEN_GUESS) + 1
        added = self.messages[self.measured_upto:]
        return self.measured_prompt + sum(message_chars(m) + MESSAGE_OVERHEAD_TOKENS for m in added)

    def _budget(self, what: str) -> _Stop:
        self.log("budget_exceeded", detail=what)
        return _Stop(f"budget: {what}")

    def _handle(self, reply: LLMReply, allowed: list[str]) -> None:
        if not reply.tool_calls:
            snippet = (reply.text or "").strip().replace("\n", " ")[:80]
            self._problem(f"the reply was text with no tool call ({snippet!r}); every turn must call a tool",
                          allowed)
            return
        problems: list[str] = []
        for call in reply.tool_calls:
            if self.regions is not None:
                self._answer(call, "skipped: the report was already made", ok=False)
                continue
            if self.n_tool_calls >= self.budget.max_tool_calls:
                self._answer(call, "skipped: tool-call budget exhausted", ok=False)
                raise self._budget(f"max_tool_calls={self.budget.max_tool_calls} exceeded")
            self.n_tool_calls += 1
            problem = self._execute(call, allowed)
            if problem:
                problems.append(problem)
        if problems and self.regions is None:
            self._problem("; ".join(problems), allowed)

    def _execute(self, call: ToolCall, allowed: list[str]) -> str | None:
        """Run one tool call and append its tool message; returns the problem when the call was malformed."""
        self.log("tool_call", id=call.id, name=call.name, arguments=call.arguments)
        if call.name not in allowed:
            return self._answer(call, f"unknown tool {call.name!r}; available tools: {', '.join(allowed)}")
        try:
            arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        except json.JSONDecodeError as err:
            return self._answer(call, f"arguments of {call.name} are not valid JSON "
                                      f"({err.msg} at char {err.pos})")
        if not isinstance(arguments, dict):
            return self._answer(call, f"arguments of {call.name} must be a JSON object")
        started = time.perf_counter()
        try:
            result = self.toolbox.call(call.name, arguments)
        except Exception as err:  # noqa: BLE001 -- the toolbox promises not to raise; if it does, the call fails
            return self._answer(call, f"{call.name} failed: {type(err).__name__}: {err}")
        ok, data, error = _result_fields(result)
        if not ok:
            return self._answer(call, f"{call.name} rejected the arguments: {error}")
        content = self.render(call.name, data) if self.render is not None else (
            getattr(result, "content", "") or _default_render()(call.name, data))
        self._answer(call, content, ok=True, seconds=time.perf_counter() - started)
        if call.name == TERMINAL_TOOL:
            # The validated regions: as the tool returned them, else as the toolbox recorded them, else the
            # arguments (which the tool just accepted).
            regions = data.get("regions")
            if not isinstance(regions, list):
                regions = getattr(self.toolbox, "report", None)
            if not isinstance(regions, list):
                regions = arguments.get("regions")
            self.regions = copy.deepcopy(list(regions or []))
        return None

    def _answer(self, call: ToolCall, content: str, *, ok: bool = False,
                seconds: float | None = None) -> str | None:
        """Append the `role: tool` message answering `call`; a failure's content is the problem itself."""
        text = content if ok else f"error: {content}"
        self.largest_result = max(self.largest_result, len(text))
        self.messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
        self.log("tool_result", id=call.id, name=call.name, ok=ok, content=text,
                 seconds=round(seconds, 4) if seconds is not None else None)
        self._logged = len(self.messages)
        return None if ok else content

    def _problem(self, problem: str, allowed: list[str]) -> None:
        """One repair prompt per allowance; past it, the attempt stops and the fallback runs."""
        if self.repairs >= self.budget.max_repairs:
            self.log("repair_refused", problem=problem)
            raise _Stop(f"malformed output after {self.repairs} repair(s): {problem}")
        self.repairs += 1
        prompt = (f"Your last reply could not be used: {problem}. Reply with exactly one tool call to one of "
                  f"{', '.join(allowed)}, with JSON arguments that match the tool's schema and patch ids "
                  f"taken from the tool results. Finish with {TERMINAL_TOOL}.")
        self.messages.append({"role": "user", "content": prompt})
        self.log("repair", problem=problem, prompt=prompt)


def run_agent(backend: Backend, toolbox: ToolBoxLike, messages: list[dict], *,
              budget: AgentBudget | None = None, transcript: Transcript | None = None,
              fallback: Backend | None = None,
              toolbox_factory: Callable[[], ToolBoxLike] | None = None,
              render: Callable[[str, dict], str] | None = None,
              fallback_budget: AgentBudget | None = None) -> AgentOutcome:
    """Run `backend` until it reports suspects; hand over to `fallback` on a second malformed reply, an
    exceeded budget or a backend exception. `messages` is not modified.

    The fallback starts from the original `messages` on a fresh toolbox, with its own `fallback_budget`
    (default AgentBudget(): the LLM's budget may be tight on purpose, the policy's needs are small and fixed):
    `toolbox_factory()` when given, else the same toolbox (its tools are then assumed stateless).
    Tool results reach the model as `render(name, data)` when given, else as the ToolResult's own `content`
    (the toolbox renders it), else as `verbalize.render.render_tool_result(name, data)`.
    """
    budget = budget or AgentBudget()
    initial = copy.deepcopy(messages)
    attempt = _Attempt(backend, toolbox, copy.deepcopy(initial), budget, transcript, render)
    attempt.log("run_start", budget=budget.model_dump(), n_messages=len(initial))
    try:
        attempt.run()
    except _Stop as stop:
        reason = str(stop)
    else:
        outcome = AgentOutcome(regions=attempt.regions or [], usage=attempt.usage,
                               n_tool_calls=attempt.n_tool_calls, turns=attempt.turns, backend=backend.name,
                               repairs=attempt.repairs,
                               messages=attempt.messages)
        attempt.log("run_end", regions=outcome.regions, usage=outcome.usage.model_dump(), turns=outcome.turns,
                    n_tool_calls=outcome.n_tool_calls, fallback_used=False)
        return outcome

    failed = AgentOutcome(usage=attempt.usage, n_tool_calls=attempt.n_tool_calls, turns=attempt.turns,
                          backend=backend.name, repairs=attempt.repairs, messages=attempt.messages)
    if fallback is None:
        failed.error = reason
        attempt.log("run_end", error=reason, fallback_used=False)
        return failed

    attempt.log("fallback", reason=reason, fallback=fallback.name)
    fresh = toolbox_factory() if toolbox_factory is not None else toolbox
    second = _Attempt(fallback, fresh, copy.deepcopy(initial), fallback_budget or AgentBudget(), transcript,
                      render)
    try:
        second.run()
        error = None
    except _Stop as stop:
        error = f"the fallback also failed: {stop} (first failure: {reason})"
    outcome = AgentOutcome(regions=second.regions or [], fallback_used=True, fallback_reason=reason,
                           usage=attempt.usage + second.usage,
                           n_tool_calls=attempt.n_tool_calls + second.n_tool_calls,
                           turns=attempt.turns + second.turns, error=error, backend=fallback.name,
                           repairs=attempt.repairs + second.repairs, messages=second.messages)
    second.log("run_end", regions=outcome.regions, usage=outcome.usage.model_dump(), turns=outcome.turns,
               n_tool_calls=outcome.n_tool_calls, fallback_used=True, fallback_reason=reason, error=error)
    return outcome
