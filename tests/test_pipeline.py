"""agent.pipeline.inspect_scan: the report contract, the fallback recorded with its reason when a model
misbehaves
(invented patch ids, endless tool calls), the agent's bank look-ups counted in the verified share and scored
exactly,
guidance reaching the prompt, the zero-shot mode, and the scan/class size check.

The misbehaving models are scripted fakes (agent.backends.scripted); the fallback is the real policy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.backends import get_backend
from agent.loop import AgentBudget
from agent.pipeline import ClassMismatch, InspectionConfig, check_scan_fits_class, inspect_scan
from agent.transcript import read_transcript
from tests.scripted import ScriptedBackend, call

REPORT_KEYS = {
    "object_score",
    "verified_fraction",
    "backend",
    "fallback",
    "usage",
    "regions",
    "mode",
    "verify_mode",
}
REGION_KEYS = {"patch_ids", "point_count", "reason", "verdict"}


def report_call(patch_ids, call_id="r"):
    regions = [{"patch_ids": patch_ids, "reason": "looks odd", "confidence": 0.8}]
    return call("report_suspects", json.dumps({"regions": regions}), call_id=call_id)


def test_policy_run_fills_the_report_contract(fitted, scan, analysis, tmp_path):
    inspection = inspect_scan(
        scan, fitted, get_backend("policy"), analysis=analysis, transcript_path=tmp_path / "t.jsonl"
    )
    report = inspection.report()
    assert REPORT_KEYS <= set(report)
    assert report["fallback"] == {"used": False, "reason": None}
    assert report["regions"] and all(REGION_KEYS <= set(r) for r in report["regions"])
    assert 0 < report["verified_fraction"] <= 0.2
    assert inspection.point_scores.shape == (len(scan),) and np.isfinite(inspection.point_scores).all()
    json.dumps(report)  # JSON-ready as it is
    events = {e["event"] for e in read_transcript(tmp_path / "t.jsonl")}
    assert {"scan", "request", "tool_call", "verification"} <= events


def test_invented_patch_ids_fall_back_to_the_policy_with_the_reason(fitted, scan, analysis, tmp_path):
    liar = ScriptedBackend([report_call([99999], "a"), report_call([99998], "b")])
    inspection = inspect_scan(scan, fitted, liar, analysis=analysis, transcript_path=tmp_path / "t.jsonl")
    report = inspection.report()
    assert report["fallback"]["used"] is True
    assert "report_suspects" in report["fallback"]["reason"]
    assert report["backend"] == "scripted" and report["reporting_backend"] == "policy"
    assert report["regions"] and all(
        max(r["patch_ids"]) < inspection.patches.n_patches for r in report["regions"]
    )
    assert len(liar.calls) == 2  # one repair prompt, then the fallback
    assert any(e["event"] == "fallback" for e in read_transcript(tmp_path / "t.jsonl"))


def test_a_model_that_never_stops_calling_tools_hits_the_budget(fitted, scan, analysis):
    chatty = ScriptedBackend([call("list_patches", json.dumps({"top_k": 3}))], repeat_last=True)
    config = InspectionConfig(budget=AgentBudget(max_turns=50, max_tool_calls=5))
    report = inspect_scan(scan, fitted, chatty, analysis=analysis, config=config).report()
    assert report["fallback"]["used"] is True
    assert "max_tool_calls=5" in report["fallback"]["reason"]
    assert len(chatty.calls) <= 6
    assert report["regions"]  # the policy still reported


def test_agent_lookups_are_bank_scores_counted_in_the_verified_share(fitted, scan, analysis):
    script = [
        call("feature_lookup", json.dumps({"patch_id": 1}), "l1"),
        call("feature_lookup", json.dumps({"patch_id": 2}), "l2"),
        report_call([3]),
    ]
    config = InspectionConfig(max_verify_fraction=0.2, lookup_fraction=0.1)
    inspection = inspect_scan(scan, fitted, ScriptedBackend(script), analysis=analysis, config=config)
    assert not inspection.outcome.fallback_used, inspection.outcome.fallback_reason
    v = inspection.verification
    looked_up = inspection.patches.points_of([1, 2])
    region = inspection.patches.points_of([3])
    assert v.verified[looked_up].all() and v.verified[region].all()
    assert v.verified.sum() == len(np.union1d(looked_up, region))
    assert v.verified_fraction <= 0.2
    full = fitted.score(analysis)
    full_scores = np.empty(len(scan), dtype=np.float32)
    full_scores[full.point_ids] = full.point_scores
    np.testing.assert_array_equal(v.point_scores[looked_up], full_scores[looked_up])


def test_lookup_budget_never_exceeds_the_verification_budget(fitted, scan, analysis):
    lookups = [call("feature_lookup", json.dumps({"patch_id": p}), f"l{p}") for p in range(12)]
    config = InspectionConfig(
        max_verify_fraction=0.05, lookup_fraction=0.5, budget=AgentBudget(max_tool_calls=40)
    )
    inspection = inspect_scan(
        scan, fitted, ScriptedBackend([*lookups, report_call([0])]), analysis=analysis, config=config
    )
    assert inspection.verification.verified_fraction <= 0.05 + 1e-9


def test_guidance_reaches_the_prompt_in_its_own_section(fitted, scan, analysis):
    model = ScriptedBackend([report_call([0])])
    config = InspectionConfig(guidance="sharp ridges are normal; look for dents near the bore")
    inspect_scan(scan, fitted, model, analysis=analysis, config=config)
    opening = "\n".join(m["content"] for m in model.calls[0] if m["role"] == "user")
    assert "sharp ridges are normal; look for dents near the bore" in opening
    assert "guidance" in opening.lower()


def test_zero_shot_without_a_bank(scan):
    inspection = inspect_scan(scan, None, get_backend("policy"))
    report = inspection.report()
    assert report["mode"] == "zero-shot" and report["verify_mode"] == "suspects"
    assert report["regions"] and report["verified_fraction"] <= 0.2
    with pytest.raises(ValueError, match="fitted class"):
        inspect_scan(scan, None, get_backend("policy"), config=InspectionConfig(verify="all"))


def test_verify_all_matches_score_full(fitted, scan):
    inspection = inspect_scan(scan, fitted, get_backend("policy"), config=InspectionConfig(verify="all"))
    scores, object_score = fitted.score_full(scan)
    np.testing.assert_array_equal(inspection.point_scores, scores)
    assert inspection.object_score == object_score
    assert inspection.report()["verify_mode"] == "all" and inspection.report()["verified_fraction"] == 1.0


def test_scan_of_another_size_is_refused(fitted, scan):
    check_scan_fits_class(scan, fitted, "ok.ply")
    check_scan_fits_class(
        scan[: len(scan) // 2], fitted, "half.ply"
    )  # a partial scan of the right part passes
    with pytest.raises(ClassMismatch, match=r"^mm\.ply: .*another class"):
        check_scan_fits_class(scan * 1000.0, fitted, "mm.ply", bank_dir="banks/bracket")


def test_a_small_context_window_gets_a_shorter_overview(fitted, scan, analysis):
    """The overview takes at most a quarter of a declared context window (fewer, coarser patches), so a small
    local
    model has room left for tool calls; without a window the configured budget holds."""
    from agent.pipeline import overview_token_budget
    from verbalize.render import estimate_tokens

    assert overview_token_budget(3000, None) == 3000 and overview_token_budget(3000, 8192) == 2048
    assert overview_token_budget(500, 8192) == 500 and overview_token_budget(3000, 1024) == 800
    runs = {}
    for window in (None, 4000):
        model = ScriptedBackend([report_call([0])])
        inspect_scan(
            scan,
            fitted,
            model,
            analysis=analysis,
            config=InspectionConfig(budget=AgentBudget(max_context_tokens=window)),
        )
        runs[window] = model.calls[0][1]["content"]
    assert estimate_tokens(runs[4000]) <= 1000 < estimate_tokens(runs[None])
