"""Agent-callable tools: schemas, dispatch, every happy path and every way a model can get the arguments
wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tools.agent_tools import MAX_REGIONS, ScanContext, ToolBox
from verbalize import describe_scan, render_tool_result

N_POINTS = 2000
N_PATCHES = 24
TOOL_NAMES = ["list_patches", "patch_geometry", "neighbourhood", "feature_lookup", "report_suspects"]


class FakeBank:
    """Stands in for the verifier's bank look-up; records which patch ids it was asked about."""

    def __init__(self, fail: bool = False) -> None:
        self.asked: list[list[int]] = []
        self.fail = fail

    def __call__(self, patch_ids: list[int]) -> dict[int, dict]:
        self.asked.append(list(patch_ids))
        if self.fail:
            raise RuntimeError("index not loaded")
        return {pid: {"similarity": 1.0 / (1 + pid), "nearest_normal": pid + 100} for pid in patch_ids}


@pytest.fixture(scope="module")
def scan():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-1, 1, size=(N_POINTS, 2))
    points = np.column_stack([xy, 0.1 * np.sin(3 * xy[:, 0])]).astype(np.float32)
    stats = {"recon_error": rng.random(N_POINTS), "feature_deviation": rng.random(N_POINTS)}
    patches, table = describe_scan(points, stats, n_patches=N_PATCHES)
    return points, patches, table


def make_box(scan, bank=None, budget=0, **kwargs) -> ToolBox:
    points, patches, table = scan
    return ToolBox(
        ScanContext(points, patches, table, bank_lookup=bank, verify_budget_points=budget), **kwargs
    )


def walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


# ---- schemas
# ----------------------------------------------------------------------------------------------------------


def test_openai_schema_shape(scan):
    box = make_box(scan)
    schemas = box.openai_schemas()
    assert [s["function"]["name"] for s in schemas] == TOOL_NAMES
    for schema in schemas:
        assert schema["type"] == "function" and set(schema["function"]) == {
            "name",
            "description",
            "parameters",
        }
        params = schema["function"]["parameters"]
        assert params["type"] == "object"
        text = json.dumps(params)
        # the backends (policy, hf decoder) read these schemas as they are: nothing to resolve
        assert not any(key in text for key in ('"$ref"', '"$defs"', '"anyOf"', '"oneOf"', '"allOf"'))
        for node in walk(params):
            if isinstance(node, dict) and node.get("type") == "object":
                assert node["additionalProperties"] is False
    list_params = schemas[0]["function"]["parameters"]["properties"]
    assert (
        set(list_params["sort_by"]["enum"]) == set(scan[2].columns)
        and "cue" in list_params["sort_by"]["enum"]
    )
    patch_id = schemas[1]["function"]["parameters"]["properties"]["patch_id"]
    assert (patch_id["minimum"], patch_id["maximum"]) == (0, scan[1].n_patches - 1)


def test_strict_schemas_require_every_property(scan):
    for schema in make_box(scan).openai_schemas(strict=True):
        assert schema["function"]["strict"] is True
        for node in walk(schema["function"]["parameters"]):
            if isinstance(node, dict) and node.get("type") == "object":
                assert sorted(node["required"]) == sorted(node["properties"])
                assert "default" not in json.dumps(node)


def test_tools_summary_names_every_tool_and_its_ranges(scan):
    summary = make_box(scan).tools_summary()
    for name in TOOL_NAMES:
        assert f"- {name}(" in summary
    assert f"patch_id: int 0..{scan[1].n_patches - 1}" in summary and "top_k: int 1..50 = 10" in summary


# ---- happy paths
# ------------------------------------------------------------------------------------------------------


def test_list_patches_sorts_by_any_column(scan):
    box = make_box(scan)
    table = scan[2]
    result = box.call("list_patches", '{"sort_by": "z_recon_error_mean", "top_k": 5}')
    assert result.ok and result.error is None
    ids = [row["id"] for row in result.data["patches"]]
    assert ids == list(np.argsort(-table.columns["z_recon_error_mean"], kind="stable")[:5])
    assert "z_recon_error_mean" in result.data["patches"][0]
    ascending = box.call("list_patches", {"sort_by": "n_points", "top_k": 3, "descending": False})
    counts = [row["n_points"] for row in ascending.data["patches"]]
    assert counts == sorted(scan[1].counts)[:3]
    default = box.call("list_patches", None)
    assert default.ok and default.data["sort_by"] == "cue" and len(default.data["patches"]) == 10
    assert json.loads(default.content) == default.data


def test_patch_geometry_samples_points_of_that_patch(scan):
    points, patches, table = scan
    box = make_box(scan)
    result = box.call("patch_geometry", {"patch_id": 4, "n_samples": 8})
    assert result.ok and result.data["patch_id"] == 4
    sample = np.array(result.data["sample_xyz"])
    assert sample.shape == (8, 3)
    members = table.normalisation.apply(points[patches.points_of([4])])
    nearest = np.min(np.linalg.norm(members[None, :, :] - sample[:, None, :], axis=2), axis=1)
    assert nearest.max() < 0.01  # every sampled point is (up to rounding) a member of patch 4
    assert result.data["descriptors"]["n_points"] == int(patches.counts[4])
    assert box.call("patch_geometry", {"patch_id": 4, "n_samples": 8}).content == result.content


def test_neighbourhood_lists_patches_within_radius(scan):
    table = scan[2]
    centres = np.stack([table.columns[a] for a in "xyz"], axis=1)
    result = make_box(scan).call("neighbourhood", {"patch_id": 0, "radius": 0.6})
    assert result.ok
    ids = [n["id"] for n in result.data["neighbours"]]
    dist = np.linalg.norm(centres - centres[0], axis=1)
    expected = [i for i in np.argsort(dist, kind="stable") if i != 0 and dist[i] <= 0.6][:12]
    assert ids == expected and 0 not in ids
    diff = result.data["differences"]["recon_error_mean"]
    assert diff["value"] == pytest.approx(table.columns["recon_error_mean"][0], rel=1e-2)
    assert "normal_angle_to_neighbours_deg" in result.data
    tiny = make_box(scan).call("neighbourhood", {"patch_id": 0, "radius": 1e-6})
    assert tiny.ok and "note" in tiny.data and len(tiny.data["neighbours"]) == 3


def test_feature_lookup_without_bank_costs_nothing(scan):
    box = make_box(scan, budget=0)
    result = box.call("feature_lookup", {"patch_id": 2})
    assert result.ok and "bank" not in result.data
    assert set(result.data["statistics"]) >= {"recon_error_mean", "z_feature_deviation_max"}


def test_feature_lookup_with_bank_draws_on_the_budget(scan):
    counts = scan[1].counts
    bank = FakeBank()
    budget = int(counts[1] + counts[2])
    box = make_box(scan, bank=bank, budget=budget)
    first = box.call("feature_lookup", {"patch_id": 1})
    assert first.ok and first.data["bank"]["nearest_normal"] == 101
    assert first.data["cost_points"] == counts[1] and box.budget_left == budget - counts[1]
    again = box.call("feature_lookup", {"patch_id": 1})  # cached: no second bank call, no cost
    assert again.ok and again.data["cost_points"] == 0 and bank.asked == [[1]]
    assert box.call("feature_lookup", {"patch_id": 2}).ok and box.budget_left == 0
    exhausted = box.call("feature_lookup", {"patch_id": 3})
    assert not exhausted.ok and "budget exhausted" in exhausted.error and "report_suspects" in exhausted.error
    assert exhausted.content.startswith("error: ") and bank.asked == [[1], [2]]
    assert set(box.bank_results) == {1, 2}


def test_feature_lookup_reports_a_failing_bank(scan):
    box = make_box(scan, bank=FakeBank(fail=True), budget=10**6)
    result = box.call("feature_lookup", {"patch_id": 0})
    assert not result.ok and "index not loaded" in result.error and box.budget_left == 10**6


def test_report_suspects_is_terminal(scan):
    box = make_box(scan)
    regions = [
        {"patch_ids": [3, 4, 3], "reason": " bump on the rim ", "confidence": 0.8},
        {"patch_ids": [7], "reason": "odd spacing", "confidence": 0.2},
    ]
    result = box.call("report_suspects", json.dumps({"regions": regions}))
    assert result.ok and box.finished
    assert box.report[0] == {"patch_ids": [3, 4], "reason": "bump on the rim", "confidence": 0.8}
    assert result.data["points"] == int(scan[1].counts[[3, 4, 7]].sum())
    second = box.call("report_suspects", {"regions": []})
    assert not second.ok and "already" in second.error
    assert box.call("list_patches", {}).ok  # reading stays possible
    empty = make_box(scan).call("report_suspects", {"regions": []})
    assert empty.ok and empty.data["accepted_regions"] == 0


def test_content_uses_the_injected_renderer(scan):
    box = make_box(scan, render=render_tool_result)
    result = box.call("patch_geometry", {"patch_id": 1})
    assert json.loads(result.content) == result.data


def test_call_log_records_every_call(scan):
    box = make_box(scan)
    box.call("list_patches", {"top_k": 2})
    box.call("nope", {})
    assert [(r.name, r.ok) for r in box.log] == [("list_patches", True), ("nope", False)]
    assert box.log[0].arguments == {"top_k": 2} and box.log[1].error.startswith("unknown tool")


# ---- invalid arguments: never an exception, always a message naming the fix
# ------------------------------------------

LAST = N_PATCHES - 1
INVALID_CALLS = [
    ("no_such_tool", {}, "unknown tool 'no_such_tool'; available tools: list_patches"),
    ("list_patches", "{top_k: 3}", "not valid JSON"),
    ("list_patches", "[1, 2]", "must be a JSON object"),
    ("list_patches", {"top_k": 0}, "top_k: Input should be greater than or equal to 1"),
    ("list_patches", {"top_k": 51}, "top_k: Input should be less than or equal to 50"),
    ("list_patches", {"top_k": "ten"}, "top_k: Input should be a valid integer"),
    ("list_patches", {"sort_by": "colour"}, "sort_by: Input should be 'x'"),
    ("list_patches", {"top_k": 3, "extra": 1}, "extra: Extra inputs are not permitted"),
    ("patch_geometry", {}, "patch_id: Field required"),
    ("patch_geometry", {"patch_id": N_PATCHES}, f"Valid patch ids are 0..{LAST}"),
    ("patch_geometry", {"patch_id": -1}, f"Valid patch ids are 0..{LAST}"),
    ("patch_geometry", {"patch_id": 1.5}, "patch_id: Input should be a valid integer"),
    (
        "patch_geometry",
        {"patch_id": 1, "n_samples": 1000},
        "n_samples: Input should be less than or equal to 64",
    ),
    ("neighbourhood", {"patch_id": 0, "radius": 0}, "radius: Input should be greater than 0"),
    ("neighbourhood", {"patch_id": 0, "radius": 5}, "radius: Input should be less than or equal to 2"),
    ("feature_lookup", {"patch_id": "abc"}, "patch_id: Input should be a valid integer"),
    ("report_suspects", {}, "regions: Field required"),
    (
        "report_suspects",
        {"regions": [{"patch_ids": [999], "reason": "x", "confidence": 0.5}]},
        f"Valid patch ids are 0..{LAST}",
    ),
    (
        "report_suspects",
        {"regions": [{"patch_ids": [], "reason": "x", "confidence": 0.5}]},
        "regions.0.patch_ids: List should have at least 1 item",
    ),
    (
        "report_suspects",
        {"regions": [{"patch_ids": [1], "reason": "x", "confidence": 1.5}]},
        "regions.0.confidence: Input should be less than or equal to 1",
    ),
    (
        "report_suspects",
        {"regions": [{"patch_ids": [1], "confidence": 0.5}]},
        "regions.0.reason: Field required",
    ),
    (
        "report_suspects",
        {"regions": [{"patch_ids": [1], "reason": "x", "confidence": 0.5}] * (MAX_REGIONS + 1)},
        "regions: List should have at most 10 items",
    ),
    (
        "report_suspects",
        {"regions": [{"patch_ids": list(range(21)), "reason": "x", "confidence": 0.5}]},
        "List should have at most 20 items",
    ),
]


@pytest.mark.parametrize(
    ("name", "arguments", "expected"), INVALID_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(INVALID_CALLS)]
)
def test_invalid_calls_return_errors_not_exceptions(scan, name, arguments, expected):
    box = make_box(scan, bank=FakeBank(), budget=10**6)
    result = box.call(name, arguments)
    assert not result.ok and result.data == {}
    assert expected in result.error, result.error
    assert result.content == f"error: {result.error}"
    assert box.report is None and box.budget_left == 10**6 and box.log[-1].ok is False


def test_context_rejects_mismatched_parts(scan):
    points, patches, table = scan
    with pytest.raises(ValueError, match="points"):
        ScanContext(points[:-1], patches, table)
    with pytest.raises(ValueError, match="verify_budget_points"):
        ScanContext(points, patches, table, verify_budget_points=-1)


def test_policy_obeys_the_report_schema_limits(scan):
    """A policy asked for more regions than report_suspects allows merges the surplus instead of being
    rejected
    (it is the fallback: a rejected report would leave the run with no report at all)."""
    from agent.backends.policy import PolicyBackend, report_limits
    from agent.loop import run_agent

    box = make_box(scan, max_regions=3, max_ids_per_region=4)
    assert report_limits(box.openai_schemas()) == (3, 4)
    task = [{"role": "user", "content": "find the defects"}]
    outcome = run_agent(
        PolicyBackend(target_share=1.0, top_k=N_PATCHES, max_regions=N_PATCHES, inspect_top=0), box, task
    )
    assert not outcome.fallback_used and outcome.error is None
    assert len(outcome.regions) == 3 and all(len(r["patch_ids"]) <= 4 for r in outcome.regions)
    assert outcome.regions[-1]["reason"].startswith("further high-cue patches")
