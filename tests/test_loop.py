"""The agent loop with scripted fake LLMs: repair, fallback, budgets, transcripts, and the policy baseline.

`FakeToolBox` mirrors the ToolBox interface (openai_schemas / call -> ToolResult(ok, data, error)) on a
hand-made patch
table, so the expected policy choice can be worked out independently in the test; one test runs the real
ToolBox.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.backends.base import LLMReply, ToolCall, Usage
from agent.backends.policy import PolicyBackend
from agent.loop import AgentBudget, run_agent
from agent.transcript import Transcript, read_transcript
from tests.scripted import ScriptedBackend, call, text
from tools.agent_tools import closed_inline_schema

# patch id -> (cue, n_points, z_recon_error_mean, z_curvature); 10 patches, 1000 points in all.
PATCHES = {
    0: (0.4, 100, 0.2, 0.3),
    1: (3.5, 60, 3.1, 2.0),
    2: (0.9, 120, 0.5, 0.9),
    3: (2.8, 70, 2.6, 1.1),
    4: (0.2, 110, 0.1, 0.2),
    5: (1.9, 90, 1.2, 2.4),
    6: (0.1, 100, 0.0, 0.1),
    7: (0.7, 130, 0.6, 0.4),
    8: (0.3, 120, 0.2, 0.1),
    9: (0.5, 100, 0.3, 0.6),
}
TOTAL_POINTS = sum(p[1] for p in PATCHES.values())
NEIGHBOURS = {1: [3, 9], 3: [1, 2]}  # patch 3 touches the top patch 1
VALID_REPORT = json.dumps(
    {"regions": [{"patch_ids": [1, 3], "reason": "high recon error", "confidence": 0.8}]}
)

PatchId = Annotated[int, Field(ge=0, le=9)]
closed = ConfigDict(extra="forbid")


class ListArgs(BaseModel):
    model_config = closed
    sort_by: str = "cue"
    top_k: int = Field(10, ge=1, le=50)
    descending: bool = True


class PatchArgs(BaseModel):
    model_config = closed
    patch_id: PatchId


class NeighbourArgs(BaseModel):
    model_config = closed
    patch_id: PatchId
    radius: float = Field(0.3, gt=0, le=2)


class Region(BaseModel):
    model_config = closed
    patch_ids: list[PatchId] = Field(min_length=1, max_length=20)
    reason: str = Field(min_length=1, max_length=300)
    confidence: float = Field(ge=0, le=1)


class ReportArgs(BaseModel):
    model_config = closed
    regions: list[Region] = Field(max_length=10)


@dataclass
class FakeResult:
    ok: bool
    data: dict
    error: str | None = None


@dataclass
class FakeToolBox:
    calls: list[tuple[str, object]] = field(default_factory=list)
    report: list[dict] | None = None

    MODELS: ClassVar[dict[str, type[BaseModel]]] = {
        "list_patches": ListArgs,
        "patch_geometry": PatchArgs,
        "neighbourhood": NeighbourArgs,
        "feature_lookup": PatchArgs,
        "report_suspects": ReportArgs,
    }

    def openai_schemas(self) -> list[dict]:
        return [
            {
                "type": "function",
                "function": {
                    "name": n,
                    "description": f"{n} tool",
                    "parameters": closed_inline_schema(m.model_json_schema()),
                },
            }
            for n, m in self.MODELS.items()
        ]

    def call(self, name: str, arguments: str | dict) -> FakeResult:
        self.calls.append((name, arguments))
        if name not in self.MODELS:
            return FakeResult(False, {}, f"unknown tool {name!r}")
        try:
            args = self.MODELS[name].model_validate(
                json.loads(arguments) if isinstance(arguments, str) else arguments
            )
        except (ValidationError, ValueError) as err:
            return FakeResult(False, {}, f"invalid arguments for {name}: {err}".replace("\n", " ")[:300])
        if name == "list_patches":
            order = sorted(PATCHES, key=lambda i: (-PATCHES[i][0], i))[: args.top_k]
            rows = [{"id": i, "n_points": PATCHES[i][1], "cue": PATCHES[i][0]} for i in order]
            return FakeResult(
                True, {"total_points": TOTAL_POINTS, "total_patches": len(PATCHES), "patches": rows}
            )
        if name == "neighbourhood":
            return FakeResult(
                True,
                {
                    "patch_id": args.patch_id,
                    "neighbours": [{"id": i} for i in NEIGHBOURS.get(args.patch_id, [])],
                },
            )
        if name in ("patch_geometry", "feature_lookup"):
            cue, n, z_rec, z_curv = PATCHES[args.patch_id]
            return FakeResult(
                True,
                {
                    "patch_id": args.patch_id,
                    "descriptors": {
                        "n_points": n,
                        "cue": cue,
                        "z_recon_error_mean": z_rec,
                        "z_curvature": z_curv,
                    },
                },
            )
        self.report = [r.model_dump() for r in args.regions]
        return FakeResult(True, {"accepted_regions": len(args.regions)})


TASK = [{"role": "system", "content": "You find defects."}, {"role": "user", "content": "Scan overview: ..."}]


def policy_run(toolbox=None, **kwargs):
    return run_agent(PolicyBackend(**kwargs), toolbox or FakeToolBox(), TASK)


# ---- the policy baseline
# ------------------------------------------------------------------------------------------
def test_policy_reports_top_cue_patches_within_point_share():
    outcome = policy_run()
    assert outcome.error is None and not outcome.fallback_used
    reported = [pid for r in outcome.regions for pid in r["patch_ids"]]
    # Worked out by hand: by cue the order is 1 (60 pts), 3 (70), 5 (90), 2 ...; 15% of 1000 = 150 points
    # admits
    # 1 and 3 (130) but not 5 (220). Patch 3 neighbours patch 1, so both form one region.
    assert reported == [1, 3]
    assert len(outcome.regions) == 1
    assert sum(PATCHES[p][1] for p in reported) <= 0.15 * TOTAL_POINTS
    assert outcome.regions[0]["reason"] == "recon_error_mean z=3.1, curvature z=2.0"


def test_policy_share_is_a_constructor_argument():
    reported = [pid for r in policy_run(target_share=0.25).regions for pid in r["patch_ids"]]
    assert reported == [1, 3, 5]  # 60 + 70 + 90 = 220 <= 250 < 220 + 120 (patch 2)


def test_policy_always_reports_at_least_one_patch():
    reported = [pid for r in policy_run(target_share=0.01).regions for pid in r["patch_ids"]]
    assert reported == [1]


# ---- repair and fallback
# ------------------------------------------------------------------------------------------
def test_malformed_json_gets_one_repair_then_succeeds():
    backend = ScriptedBackend(
        [call("list_patches", '{"top_k": 5,'), call("report_suspects", VALID_REPORT, "c2")]
    )
    outcome = run_agent(backend, FakeToolBox(), TASK, fallback=PolicyBackend())
    assert not outcome.fallback_used and outcome.error is None
    assert outcome.repairs == 1
    assert outcome.regions[0]["patch_ids"] == [1, 3]
    repair = backend.calls[1][-1]
    assert repair["role"] == "user" and "not valid JSON" in repair["content"]
    # every tool call in the conversation is answered by a tool message with its id
    tool_msg = backend.calls[1][-2]
    assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == "call_0"


def test_malformed_twice_falls_back_with_reason():
    backend = ScriptedBackend([call("list_patches", "{oops"), call("list_patches", "not json either", "c2")])
    toolbox = FakeToolBox()
    fresh = FakeToolBox()
    outcome = run_agent(backend, toolbox, TASK, fallback=PolicyBackend(), toolbox_factory=lambda: fresh)
    assert outcome.fallback_used and outcome.backend == "policy"
    assert "malformed" in outcome.fallback_reason and "not valid JSON" in outcome.fallback_reason
    assert [pid for r in outcome.regions for pid in r["patch_ids"]] == [1, 3]
    assert fresh.calls and fresh.report is not None  # the fallback ran on the fresh toolbox


def test_unknown_tool_is_named_in_the_repair_prompt():
    backend = ScriptedBackend([call("delete_scan", "{}"), call("report_suspects", VALID_REPORT, "c2")])
    outcome = run_agent(backend, FakeToolBox(), TASK, fallback=PolicyBackend())
    assert not outcome.fallback_used
    assert "unknown tool 'delete_scan'" in backend.calls[1][-1]["content"]


def test_invented_patch_ids_are_rejected_and_repaired():
    bad = json.dumps({"regions": [{"patch_ids": [42], "reason": "x", "confidence": 0.5}]})
    backend = ScriptedBackend([call("report_suspects", bad), call("report_suspects", VALID_REPORT, "c2")])
    outcome = run_agent(backend, FakeToolBox(), TASK, fallback=PolicyBackend())
    assert not outcome.fallback_used and outcome.regions[0]["patch_ids"] == [1, 3]
    assert "42" in backend.calls[1][-2]["content"]  # the tool message says which id was wrong


def test_schema_violation_then_text_only_reply_falls_back():
    bad = json.dumps({"regions": [{"patch_ids": [1], "reason": "x", "confidence": 7}]})
    backend = ScriptedBackend([call("report_suspects", bad), text("I think patch 1 is broken.")])
    outcome = run_agent(backend, FakeToolBox(), TASK, fallback=PolicyBackend())
    assert outcome.fallback_used and "no tool call" in outcome.fallback_reason


def test_endless_tool_calls_hit_the_budget_and_fall_back():
    backend = ScriptedBackend([call("feature_lookup", '{"patch_id": 1}')], repeat_last=True)
    budget = AgentBudget(max_turns=50, max_tool_calls=5)
    outcome = run_agent(backend, FakeToolBox(), TASK, budget=budget, fallback=PolicyBackend())
    assert outcome.fallback_used and "max_tool_calls=5" in outcome.fallback_reason
    assert len(backend.calls) == 6  # five calls ran, the sixth was refused
    assert outcome.regions


def test_max_turns_budget():
    backend = ScriptedBackend([call("feature_lookup", '{"patch_id": 2}')], repeat_last=True)
    outcome = run_agent(
        backend, FakeToolBox(), TASK, budget=AgentBudget(max_turns=3), fallback=PolicyBackend()
    )
    assert outcome.fallback_used and "max_turns=3" in outcome.fallback_reason and len(backend.calls) == 3


def test_token_budget():
    backend = ScriptedBackend([call("feature_lookup", '{"patch_id": 2}', tokens=1000)], repeat_last=True)
    outcome = run_agent(
        backend, FakeToolBox(), TASK, budget=AgentBudget(max_total_tokens=1500), fallback=PolicyBackend()
    )
    assert outcome.fallback_used and "max_total_tokens=1500" in outcome.fallback_reason
    assert outcome.usage.completion_tokens == 2000  # both LLM turns are counted; the policy costs nothing


def test_backend_timeout_falls_back():
    backend = ScriptedBackend([TimeoutError("read timed out after 60 s")])
    outcome = run_agent(backend, FakeToolBox(), TASK, fallback=PolicyBackend())
    assert outcome.fallback_used and "TimeoutError" in outcome.fallback_reason and outcome.regions


def test_without_fallback_the_failure_is_reported_not_raised():
    outcome = run_agent(ScriptedBackend([RuntimeError("boom")]), FakeToolBox(), TASK)
    assert outcome.regions == [] and not outcome.fallback_used
    assert "RuntimeError: boom" in outcome.error


def test_fallback_uses_toolbox_factory_and_original_messages():
    made: list[FakeToolBox] = []

    def factory() -> FakeToolBox:
        made.append(FakeToolBox())
        return made[-1]

    first = FakeToolBox()
    fallback = ScriptedBackend([call("report_suspects", VALID_REPORT)])
    outcome = run_agent(
        ScriptedBackend([ValueError("x")]), first, TASK, fallback=fallback, toolbox_factory=factory
    )
    assert outcome.fallback_used and len(made) == 1 and made[0].report is not None and first.report is None
    assert fallback.calls[0] == TASK  # from the start, not from the failed conversation


def test_input_messages_are_not_modified():
    task = json.loads(json.dumps(TASK))
    run_agent(PolicyBackend(), FakeToolBox(), task)
    assert task == TASK


# ---- transcript
# ---------------------------------------------------------------------------------------------------
def test_transcript_records_events_and_never_the_api_key(tmp_path, monkeypatch):
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    path = tmp_path / "run.jsonl"
    # the key even slips into the conversation: it must still not reach the file
    task = [*TASK, {"role": "user", "content": f"my key is {secret}"}]
    backend = ScriptedBackend([call("list_patches", "{bad"), call("list_patches", "{bad", "c2")])
    with Transcript(path) as transcript:
        outcome = run_agent(backend, FakeToolBox(), task, transcript=transcript, fallback=PolicyBackend())
    raw = path.read_text()
    assert secret not in raw and "[redacted]" in raw
    kinds = [e["event"] for e in read_transcript(path)]
    for kind in (
        "run_start",
        "request",
        "reply",
        "tool_call",
        "tool_result",
        "repair",
        "fallback",
        "run_end",
    ):
        assert kind in kinds, kind
    end = read_transcript(path)[-1]
    assert end["fallback_used"] and end["fallback_reason"] == outcome.fallback_reason
    replies = [e for e in read_transcript(path) if e["event"] == "reply"]
    assert replies[0]["usage"]["completion_tokens"] == 5 and "seconds" in replies[0]


def test_transcript_rejects_a_corrupt_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"event": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 2"):
        read_transcript(path)


# ---- the real ToolBox
# ---------------------------------------------------------------------------------------------
def test_policy_with_the_real_toolbox():
    np = pytest.importorskip("numpy")
    agent_tools = pytest.importorskip("tools.agent_tools")
    from verbalize.describe import describe_scan

    rng = np.random.default_rng(0)
    xy = rng.uniform(-1, 1, size=(3000, 2))
    points = np.column_stack([xy, 0.01 * rng.standard_normal(3000)]).astype(np.float32)
    bump = np.linalg.norm(xy - [0.5, 0.5], axis=1) < 0.15
    points[bump, 2] += 0.2
    recon = np.where(bump, 1.0, 0.05) + 0.01 * rng.random(3000)
    patches, table = describe_scan(points, {"recon_error": recon}, n_patches=48, seed=0)
    toolbox = agent_tools.ToolBox(agent_tools.ScanContext(points=points, patches=patches, table=table))
    outcome = run_agent(PolicyBackend(target_share=0.15), toolbox, TASK)
    assert outcome.error is None, outcome.error
    reported = sorted({pid for r in outcome.regions for pid in r["patch_ids"]})
    # The bump covers ~1.8% of the area. Every patch made mostly of bump points must be reported, the patch
    # with the
    # most bump points must be in one of the two most confident regions, and the report stays within 15% of
    # the points.
    bump_share = np.bincount(patches.patch_of_point[bump], minlength=patches.n_patches) / patches.counts
    assert set(np.flatnonzero(bump_share > 0.5)) <= set(reported)
    assert int(np.argmax(bump_share)) in outcome.regions[0]["patch_ids"] + outcome.regions[1]["patch_ids"]
    assert patches.counts[reported].sum() <= 0.15 * len(points)
    assert toolbox.report is not None and "z=" in outcome.regions[0]["reason"]


def _chatty_until_told(offered: list[list[str]]):
    """A model that lists patches forever unless report_suspects is the only tool on offer; its prompt_tokens
    are
    the request's characters / 4, as a real tokenizer would roughly count them."""

    def step(messages, tools):
        names = [t["function"]["name"] for t in tools]
        offered.append(names)
        prompt = (len(json.dumps(messages)) + len(json.dumps(tools))) // 4
        reply = (
            call("report_suspects", VALID_REPORT)
            if names == ["report_suspects"]
            else call("list_patches", '{"top_k": 10}', call_id=f"c{len(offered)}")
        )
        reply.usage.prompt_tokens = prompt
        return reply

    return step


def test_context_window_asks_for_the_report_before_the_window_fills():
    offered: list[list[str]] = []
    backend = ScriptedBackend([_chatty_until_told(offered)], repeat_last=True)
    backend.max_tokens = 100  # the reply reserve the loop keeps free
    box = FakeToolBox()
    first = (len(json.dumps(TASK)) + len(json.dumps(box.openai_schemas()))) // 4
    window = first + 100 + 900  # room for the task and a few listings, not for eight
    outcome = run_agent(backend, box, TASK, budget=AgentBudget(max_context_tokens=window))
    assert not outcome.fallback_used and outcome.backend == "scripted"
    assert outcome.regions[0]["patch_ids"] == [1, 3]  # the model's own report survives
    assert offered[-1] == ["report_suspects"] and all(len(o) == 5 for o in offered[:-1])
    assert 1 < len(offered) < 8  # stopped listing before max_turns, after at least one listing
    assert any(
        m.get("content", "") and "context window" in m["content"]
        for m in outcome.messages
        if m["role"] == "user"
    )


def test_context_window_too_small_for_the_task_falls_back_without_calling_the_model():
    backend = ScriptedBackend([call("report_suspects", VALID_REPORT)])
    outcome = run_agent(
        backend, FakeToolBox(), TASK, budget=AgentBudget(max_context_tokens=300), fallback=PolicyBackend()
    )
    assert outcome.fallback_used and "context window of 300 tokens" in outcome.fallback_reason
    assert backend.calls == [] and outcome.regions


def test_backend_declared_context_window_is_used():
    offered: list[list[str]] = []
    backend = ScriptedBackend([_chatty_until_told(offered)], repeat_last=True)
    backend.max_tokens = 100
    backend.context_window = (
        len(json.dumps(TASK)) + len(json.dumps(FakeToolBox().openai_schemas()))
    ) // 4 + 1000
    outcome = run_agent(backend, FakeToolBox(), TASK)
    assert not outcome.fallback_used and offered[-1] == ["report_suspects"]


@pytest.mark.parametrize("calls_per_reply, reports_usage", [(1, True), (3, True), (1, False)])
def test_context_window_is_never_exceeded_when_every_character_is_a_token(calls_per_reply, reports_usage):
    """Digit-heavy tool results can cost a token per character (SmolLM2 splits digits): the estimate must hold
    even
    then, with parallel tool calls and with a backend that reports no usage, and the model must still get its
    finish
    turn while it fits."""
    sizes: list[int] = []
    offered: list[list[str]] = []
    reserve = 64

    def step(messages, tools):
        names = [t["function"]["name"] for t in tools]
        offered.append(names)
        # one token per character of every message's text and tool-call arguments, 8 per message for the chat
        # template, and every tool schema whatever the request offers (servers render them their own way)
        sizes.append(
            len(json.dumps(FakeToolBox().openai_schemas()))
            + sum(
                len(m.get("content") or "")
                + 8
                + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls") or [])
                for m in messages
            )
        )
        if names == ["report_suspects"]:
            reply = call("report_suspects", VALID_REPORT)
        else:
            reply = LLMReply(
                tool_calls=[
                    ToolCall(
                        id=f"c{len(offered)}_{i}",
                        name="patch_geometry",
                        arguments=json.dumps({"patch_id": i + 1}),
                    )
                    for i in range(calls_per_reply)
                ]
            )
        reply.usage = (
            Usage(prompt_tokens=sizes[-1], completion_tokens=sum(len(c.arguments) for c in reply.tool_calls))
            if reports_usage
            else Usage()
        )
        return reply

    backend = ScriptedBackend([step], repeat_last=True)
    backend.max_tokens = reserve
    first = len(json.dumps(TASK)) + len(json.dumps(FakeToolBox().openai_schemas()))
    window = first + reserve + 1200
    outcome = run_agent(
        backend,
        FakeToolBox(),
        TASK,
        budget=AgentBudget(max_context_tokens=window, max_turns=30, max_tool_calls=60),
    )
    assert not outcome.fallback_used, outcome.fallback_reason
    assert offered[-1] == ["report_suspects"] and len(offered) > 2
    assert max(sizes) + reserve <= window


def test_the_policy_has_no_context_window():
    """A window set for a run's language models does not apply to the policy (it reads JSON, not tokens): no
    context fallback, and the conversation it gets is the same as without a window."""
    from agent.loop import context_window

    budget = AgentBudget(max_context_tokens=300)
    assert context_window(PolicyBackend(), budget) is None
    outcome = run_agent(PolicyBackend(), FakeToolBox(), TASK, budget=budget)
    assert not outcome.fallback_used and outcome.regions
