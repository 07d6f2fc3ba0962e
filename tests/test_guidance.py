"""Guidance that acts without an LLM (issue 13 item 5): the held-out paraphrases are read into the episodes'
intents, the policy and the ranker change what they report by them, report.json says how, and the harness runs
guided rows from a backend spec (tests/test_harness.py)."""

from __future__ import annotations

import json

import pytest

from agent.backends.policy import PolicyBackend
from agent.backends.ranker import FORMAT, RankerBackend
from agent.guidance import guidance_in_messages, read_guidance, reading_summary
from agent.tune.guidance import KIND_WORDS, make_guidance, paraphrase_ids
from evals.config import HarnessError, parse_backend

COLUMNS = "id x y z n_points z_curvature z_roughness z_spacing z_recon_error_mean z_recon_error_max cue"
# 0: a ridge (curvature only, the highest cue); 1: unusual to the model; 2: sparse and a little unusual
ROWS = [
    (0, -0.5, 0.0, 0.0, 100, 6.0, 3.0, 0.0, 0.0, 0.2, 2.0),
    (1, 0.5, 0.0, 0.0, 100, 0.0, 0.0, 0.0, 3.0, 4.0, 1.5),
    (2, 0.5, 0.5, 0.0, 100, 0.0, 0.0, 3.0, 0.5, 0.5, 1.4),
    (3, 0.0, -0.5, 0.0, 100, 0.1, 0.0, 0.0, 0.0, 0.1, 0.1),
    (4, 0.0, 0.5, 0.0, 100, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1),
    (5, -0.5, -0.5, 0.0, 100, 0.0, 0.0, 0.1, 0.0, 0.0, 0.1),
]
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {}}}
    for name in ("list_patches", "report_suspects")
]


def conversation(guidance: str | None) -> list[dict]:
    """The opening messages as the pipeline writes them: the overview's table and the guidance section."""
    table = "\n".join([COLUMNS, *(" ".join(str(v) for v in row) for row in ROWS)])
    overview = f"# Scan overview\nPoints: 600. Patches: 6.\n\n## Patch table\n{table}\n"
    if guidance is not None:
        overview += f"\n## Operator guidance\n<<<GUIDANCE\n{guidance}\nGUIDANCE>>>\n"
    return [{"role": "system", "content": "inspect"}, {"role": "user", "content": overview}]


def policy_report(guidance: str | None) -> list[list[int]]:
    """The patch ids the policy reports, run turn by turn with list_patches answered from ROWS."""
    policy, messages = PolicyBackend(), conversation(guidance)
    reply = policy.chat(messages, TOOLS)
    call = reply.tool_calls[0]
    assert call.name == "list_patches"
    top_k = json.loads(call.arguments)["top_k"]
    listed = sorted(ROWS, key=lambda r: -r[-1])[:top_k]
    result = {
        "total_points": 600,
        "total_patches": 6,
        "patches": [
            {"id": r[0], "x": r[1], "y": r[2], "z": r[3], "n_points": r[4], "cue": r[-1]} for r in listed
        ],
    }
    messages += [reply.to_message(), {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    report = policy.chat(messages, TOOLS).tool_calls[0]
    assert report.name == "report_suspects"
    return [r["patch_ids"] for r in json.loads(report.arguments)["regions"]]


def test_every_held_out_paraphrase_is_read_into_its_intent():
    for p in paraphrase_ids("normal_feature", "test"):
        assert read_guidance(make_guidance("normal_feature", p).text, use_model=False).normal_features
    for kind in KIND_WORDS:
        for p in paraphrase_ids("only_kind", "test"):
            read = read_guidance(make_guidance("only_kind", p, defect_kind=kind).text, use_model=False)
            assert read.look_for == (kind,) and not read.normal_features
    for p in paraphrase_ids("ignore_region", "test"):
        for axis, above, value in (("x", True, 0.2), ("z", False, -0.3)):
            guidance = make_guidance("ignore_region", p, axis=axis, above=above, value=value)
            (region,) = read_guidance(guidance.text, use_model=False).ignore
            assert (region.axis, region.above, region.value) == (axis, above, value)
    assert read_guidance("Sharp ridges are normal here.", use_model=False).normal_features == ("edges",)
    assert read_guidance("The bolt holes are by design.", use_model=False).normal_features == ("holes",)


def test_the_guidance_section_the_overview_renders_is_found(fitted, scan, analysis):
    from agent.pipeline import InspectionConfig, build_conversation

    config = InspectionConfig(guidance="Sharp ridges are normal here.")
    messages = build_conversation(scan, fitted, analysis, config, scan[:, 0] != scan[:, 0])[3]
    assert guidance_in_messages(messages) == "Sharp ridges are normal here."


def test_the_policy_drops_a_named_normal_feature_and_keeps_the_defect():
    assert policy_report(None) == [[0]]  # unguided, the ridge has the highest cue
    assert policy_report("Sharp ridges are normal here.") == [[1]]


def test_the_policy_leaves_out_an_ignored_region():
    assert policy_report("Skip the area with x below 0.0 in the normalised box.") == [[1]]


def test_the_policy_favours_the_named_defect_kinds_cues():
    assert policy_report("Restrict the report to holes (missing surface).") == [[2]]


def test_the_ranker_applies_the_guidance_to_its_probabilities(tmp_path):
    model = {
        "format": FORMAT,
        "features": ["z_curvature", "z_recon_error_max"],
        "mean": [0.0, 0.0],
        "scale": [1.0, 1.0],
        "coef": [1.0, 1.0],
        "intercept": -3.0,
        "threshold": 0.5,
    }
    (tmp_path / "ranker.json").write_text(json.dumps(model))
    ranker = RankerBackend(model=tmp_path / "ranker.json", target_share=1.0)

    def reported(guidance: str | None) -> list[int]:
        call = ranker.chat(conversation(guidance), TOOLS).tool_calls[0]
        return [i for r in json.loads(call.arguments)["regions"] for i in r["patch_ids"]]

    assert reported(None) == [0, 1]
    assert reported("Sharp ridges are normal here.") == [1]
    assert reported("Ignore everything with x above 0.0 (normalised coordinates).") == [0]


def test_guidance_without_an_intent_is_reported_as_not_used():
    summary = reading_summary(conversation("the weather is nice today"), "policy")
    assert summary["used"] is False and "read no intent" in summary["note"]
    summary = reading_summary(conversation("Sharp ridges are normal here."), "policy")
    assert summary["used"] is True and summary["read"]["normal_features"] == ["edges"]
    assert "curvature" in summary["applied"]


def test_backend_specs_take_options_and_guidance():
    spec = parse_backend("hf:adapter=none")
    assert (spec.name, spec.kwargs["adapter"], spec.guidance) == ("hf", "none", None)
    spec = parse_backend("ranker:model=r.json;guidance=Sharp ridges are normal here.")
    assert (spec.kwargs, spec.guidance) == ({"model": "r.json"}, "Sharp ridges are normal here.")
    assert parse_backend("hf:SmolLM2").kwargs["model"] == "SmolLM2"  # the older spelling still works
    named = parse_backend("policy:guidance=Sharp ridges are normal here.;label=policy+ridges")
    assert (named.label, named.guidance) == ("policy+ridges", "Sharp ridges are normal here.")
    with pytest.raises(HarnessError, match="adaptor"):
        parse_backend("hf:adaptor=none")
