"""Guidance that calls a feature normal, applied by the learned recognisers (agent.normal_features): the side
of the surface (detector.surface_cues), the shape descriptors (verbalize.shape), fitting (agent.tune
.recogniser_fit) and the pipeline dropping the recognised patches for any backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial import cKDTree

from agent.backends.policy import PolicyBackend
from agent.guidance import handling, left_to_backend, read_guidance
from agent.guided_report import drop_normal_features
from agent.normal_features import SHIPPED, NormalFeatureRecognisers, named_kinds, recogniser_features
from agent.pipeline import InspectionConfig, inspect_scan
from agent.tune.recogniser_fit import fit_recognisers, save_recognisers
from detector.surface_cues import plane_side
from scans.patches import build_patches
from verbalize.shape import SHAPE_COLUMNS, deviation_shape


def _grid(n: int = 60) -> np.ndarray:
    u, v = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n))
    return np.column_stack([u.ravel(), v.ravel(), np.zeros(n * n)])


def test_plane_side_tells_added_from_removed_material():
    template = _grid(30)
    normals = np.tile([0.0, 0.0, 1.0], (len(template), 1))
    probe = np.array([[0.1, 0.1, 0.05], [0.1, 0.1, -0.05], [0.3, -0.2, 0.0]])
    assert plane_side(probe, cKDTree(template), normals).tolist() == [1.0, -1.0, 0.0]


def _planted(points: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Cues and sides of a flat grid with a raised line (a rib along x at y = 0.5), a sunk round dent at
    (-0.5, -0.5) and three alike uncovered-rim rings (a row of holes along y at x = 0.5)."""
    x, y = points[:, 0], points[:, 1]
    rib = (np.abs(y - 0.5) < 0.03) & (np.abs(x) < 0.6)
    dent = np.hypot(x + 0.5, y + 0.5) < 0.12
    holes = np.zeros(len(points), dtype=bool)
    for cy in (-0.6, -0.2, 0.2):
        r = np.hypot(x - 0.6, y - cy)
        holes |= (r > 0.05) & (r < 0.09)
    surface = np.where(rib | dent, 3.0, 0.2)
    rim = np.where(holes, 3.0, 0.0)
    side = np.where(rib, 1.0, np.where(dent, -1.0, 0.0))
    return {"surface_distance": surface, "uncovered_rim": rim}, side, rib, dent | holes


def test_shape_descriptors_say_raised_or_sunk_line_or_blob_and_repeated():
    points = _grid()
    stats, side, rib, _ = _planted(points)
    x, y = points[:, 0], points[:, 1]
    patches = build_patches(points, 64, seed=0)
    shape = deviation_shape(points, stats, side, patches)
    assert set(shape) == set(SHAPE_COLUMNS) and all(len(v) == patches.n_patches for v in shape.values())

    def patch_at(px: float, py: float) -> int:
        return int(patches.patch_of_point[np.argmin(np.hypot(x - px, y - py))])

    on_rib, on_dent, on_hole, plain = (
        patch_at(0.0, 0.5),
        patch_at(-0.5, -0.5),
        patch_at(0.6, -0.2),
        patch_at(-0.8, 0.1),
    )
    assert shape["raised"][on_rib] > 0.9 and shape["raised"][on_dent] < -0.9
    assert shape["blob_elongation"][on_rib] > 0.8 > 0.3 > shape["blob_elongation"][on_dent]
    assert shape["blob_extent"][on_rib] > 2 * shape["blob_extent"][on_dent]
    assert shape["rim_share"][on_hole] == 1.0 and shape["similar_blobs"][on_hole] >= 2
    assert shape["off_share"][plain] == 0.0 and shape["blob_share"][plain] == 0.0
    again = deviation_shape(points, stats, side, patches)
    assert all(np.array_equal(shape[k], again[k]) for k in shape)  # deterministic
    assert deviation_shape(points, {"recon_error": stats["surface_distance"]}, side, patches) == {}


def _rows(rng: np.random.Generator, kind: str, n: int) -> list[dict]:
    """Recogniser rows: a kind's rows are raised and long, defect rows sunk and round (plus noise columns)."""
    rows = []
    for _ in range(n):
        feature = {"edges": (1.0, 0.8), "defect": (-0.6, 0.2)}[kind]
        rows.append(
            {
                "patch": 0,
                "label": kind,
                "values": {
                    "shape_raised": feature[0] + rng.normal(scale=0.2),
                    "shape_blob_elongation": feature[1] + rng.normal(scale=0.1),
                    "z_curvature": rng.normal(),
                    "cue": abs(rng.normal()) + 1,
                },
            }
        )
    return rows


def _episodes(rng: np.random.Generator, scans: int = 12) -> list[dict]:
    return [
        {
            "scan": f"s{i}",
            "guidance": None,
            "recogniser_rows": _rows(rng, "defect", 4) + (_rows(rng, "edges", 3) if i % 2 else []),
        }
        for i in range(scans)
    ]


def test_fitted_recognisers_learn_the_shape_and_protect_defects(rng, tmp_path):
    model = fit_recognisers(_episodes(rng))
    edges = model["kinds"]["edges"]
    assert set(model["kinds"]) == {"edges"} and edges["rows"] == 18 and edges["defect_rows"] == 48
    assert edges["threshold"] >= 0.5 and edges["held_out_feature_recall"] > 0.8
    recognisers = NormalFeatureRecognisers.load(save_recognisers(model, tmp_path))
    rib = {"shape_raised": 1.0, "shape_blob_elongation": 0.85, "z_curvature": 0.0, "cue": 2.0}
    dent = {"shape_raised": -0.7, "shape_blob_elongation": 0.1, "z_curvature": 0.0, "cue": 2.0}
    model_edges = recognisers.kinds["edges"]
    assert model_edges.probability(rib) >= model_edges.threshold > model_edges.probability(dent)
    with pytest.raises(ValueError, match="no recogniser rows"):
        fit_recognisers([{"scan": "a", "guidance": None}])


@pytest.mark.parametrize(
    "text, match",
    [
        ("not json", "cannot read"),
        (json.dumps({"format": "other"}), "not a scanagent-normal-features"),
        (json.dumps({"format": "scanagent-normal-features", "kinds": {}}), "no recognisers"),
        (
            json.dumps({"format": "scanagent-normal-features", "kinds": {"edges": {"features": ["a"]}}}),
            "malformed",
        ),
    ],
)
def test_a_tampered_recogniser_file_is_refused_naming_it(tmp_path, text, match):
    path = tmp_path / "normal-features.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        NormalFeatureRecognisers.load(path)
    assert str(path) in str(err.value)


def test_the_shipped_recognisers_cover_both_features_and_were_trained_on_episodes():
    shipped = NormalFeatureRecognisers.load(SHIPPED)
    assert set(shipped.kinds) == {"edges", "holes"}
    assert all(model.threshold >= 0.5 for model in shipped.kinds.values())
    assert shipped.trained_on["scans"] >= 20
    assert named_kinds("Sharp ridges are normal here.", shipped) == ("edges",)
    assert named_kinds("Look for dents.", shipped) == () and named_kinds(None, shipped) == ()


def test_backends_leave_the_handled_features_to_the_recognisers():
    intents = read_guidance("The bolt holes are by design. Ignore x above 0.5.", use_model=False)
    assert left_to_backend(intents) == intents  # outside an inspection nothing is handled
    with handling(("holes",)):
        left = left_to_backend(intents)
    assert left.normal_features == () and left.ignore == intents.ignore


def test_the_pipeline_drops_recognised_patches_for_any_backend_and_says_so(fitted, tmp_path):
    """A planted recogniser (a patch is "edges" when it lies off-normal at all) on the tiny fit: guidance
    naming edges removes exactly the recognised patches from the report, says which in report.json's
    guidance entry, and leaves an unguided run alone."""
    from tests.tiny import part_scans

    points = part_scans(1, 3000, seed=77)[0]
    model = {
        "format": "scanagent-normal-features",
        "kinds": {
            "edges": {
                "features": ["shape_off_share"],
                "mean": [0.0],
                "scale": [0.01],
                "coef": [10.0],
                "intercept": -5.0,
                "threshold": 0.5,
            }
        },
        "trained_on": {"scans": 0},
    }
    path = tmp_path / "planted.json"
    path.write_text(json.dumps(model))
    config = InspectionConfig(normal_features=str(path), verify="suspects")
    plain = inspect_scan(points, fitted, PolicyBackend(), config=config)
    assert plain.guidance is None and plain.table.shape
    guided_config = InspectionConfig(normal_features=str(path), guidance="Sharp ridges are normal here.")
    guided = inspect_scan(points, fitted, PolicyBackend(), config=guided_config)
    entry = guided.guidance["normal_features"]
    assert entry["kinds"] == ["edges"] and entry["recogniser"] == "planted.json"
    assert "left to the learned recogniser" in guided.guidance["applied"]
    # the policy leaves edges to the recognisers, so it reports what it reports unguided, less the patches
    # the recogniser calls edges (off-normal ones here)
    expected, summary = drop_normal_features(
        plain.outcome.regions, plain.table, ("edges",), NormalFeatureRecognisers.load(path)
    )
    assert guided.outcome.regions == expected and entry["dropped_patches"] == summary["dropped_patches"]
    off = {p for p in range(guided.table.n_patches) if guided.table.shape["off_share"][p] >= 0.005}
    assert entry["dropped_patches"] and set(entry["dropped_patches"]) <= off
    assert not {p for r in guided.outcome.regions for p in r["patch_ids"]} & off
    assert [v.patch_ids for v in guided.verification.regions] == [r["patch_ids"] for r in expected]
    row = recogniser_features(guided.table, 0)
    assert "shape_raised" in row and "cue" in row and not any(k in row for k in ("x", "y", "z"))


def test_an_ignored_region_is_kept_out_of_a_backend_that_does_not_read_guidance(fitted):
    """A scripted backend (uses_guidance False) reports every patch: "ignore x above 0.2" still keeps the
    patches centred there out of the report and the verification, and report.json says which."""
    from agent.backends.base import LLMReply, ToolCall
    from tests.scripted import ScriptedBackend
    from tests.tiny import part_scans

    points = part_scans(1, 3000, seed=78)[0]

    def report_all(messages, tools):
        ids = list(range(20))
        args = json.dumps({"regions": [{"patch_ids": ids, "reason": "all", "confidence": 0.5}]})
        return LLMReply(text=None, tool_calls=[ToolCall(id="r", name="report_suspects", arguments=args)])

    config = InspectionConfig(guidance="Ignore x above 0.2.")
    backend = ScriptedBackend([report_all])
    inspection = inspect_scan(points, fitted, backend, config=config, use_fallback=False)
    entry = inspection.guidance["ignored_regions"]
    x = inspection.table.columns["x"]
    expected = [p for p in range(20) if x[p] > 0.2]
    assert entry["regions"] == ["x > 0.2"] and entry["dropped_patches"] == expected and expected
    kept = [p for r in inspection.outcome.regions for p in r["patch_ids"]]
    assert kept == [p for p in range(20) if x[p] <= 0.2]
    assert inspection.guidance["used"] is False  # the backend did not read it; the report still obeys it
    assert "ignored regions were still applied" in inspection.guidance["note"]
    assert "normal_features" not in inspection.guidance  # no normal feature was named


def test_a_named_defect_kind_adds_the_patches_its_recogniser_calls_that_kind_first(fitted, tmp_path):
    """A planted bulge recogniser (off-normal patches are "bulge") and a backend that reports nothing: "Look
    for bulges only." puts up to 3 of the off-normal patches, most likely first, in a region of their own."""
    from agent.backends.base import LLMReply, ToolCall
    from agent.guided_report import LOOK_FOR_PATCHES
    from tests.scripted import ScriptedBackend
    from tests.tiny import part_scans

    points = part_scans(1, 3000, seed=79)[0]
    planted = {"features": ["shape_off_share"], "mean": [0.0], "scale": [0.01], "coef": [10.0]}
    model = {
        "format": "scanagent-normal-features",
        "kinds": {"edges": {**planted, "intercept": -5.0, "threshold": 0.99}},
        "defect_kinds": {"bulge": {**planted, "intercept": -5.0, "threshold": 0.5}},
    }
    path = tmp_path / "planted.json"
    path.write_text(json.dumps(model))
    empty = json.dumps({"regions": []})
    reply = LLMReply(text=None, tool_calls=[ToolCall(id="r", name="report_suspects", arguments=empty)])
    config = InspectionConfig(normal_features=str(path), guidance="Look for bulges only.")
    inspection = inspect_scan(points, fitted, ScriptedBackend([reply]), config=config, use_fallback=False)
    entry = inspection.guidance["named_kinds"]
    recognisers = NormalFeatureRecognisers.load(path)
    bulge = recognisers.defect_kinds["bulge"]
    scores = {
        p: bulge.probability(recogniser_features(inspection.table, p))
        for p in range(inspection.table.n_patches)
    }
    likely = sorted((p for p in scores if scores[p] >= 0.5), key=lambda p: (-scores[p], p))
    assert entry == {"kinds": ["bulge"], "added_patches": likely[:LOOK_FOR_PATCHES]} and likely
    assert [r["patch_ids"] for r in inspection.outcome.regions] == [likely[:LOOK_FOR_PATCHES]]
    assert "looks like bulge" in inspection.outcome.regions[0]["reason"]
    del model["defect_kinds"]  # a file without defect-kind recognisers adds nothing
    path.write_text(json.dumps(model))
    older = NormalFeatureRecognisers.load(path)
    assert older.defect_kinds == {}


def test_a_backend_that_keeps_guidance_out_of_its_prompt_gets_none_and_the_report_still_obeys_it(fitted):
    from agent.backends.base import LLMReply, ToolCall
    from tests.scripted import ScriptedBackend
    from tests.tiny import part_scans

    class Shielded(ScriptedBackend):
        guidance_in_prompt = False

    args = json.dumps({"regions": [{"patch_ids": list(range(20)), "reason": "all", "confidence": 0.5}]})
    reply = LLMReply(text=None, tool_calls=[ToolCall(id="r", name="report_suspects", arguments=args)])
    backend = Shielded([reply])
    config = InspectionConfig(guidance="Ignore x above 0.2.")
    points = part_scans(1, 3000, seed=80)[0]
    inspection = inspect_scan(points, fitted, backend, config=config, use_fallback=False)
    prompt = json.dumps(backend.calls[0])
    assert "Ignore x above" not in prompt and "GUIDANCE" not in prompt
    assert inspection.guidance["ignored_regions"]["dropped_patches"]
    x = inspection.table.columns["x"]
    assert all(x[p] <= 0.2 for r in inspection.outcome.regions for p in r["patch_ids"])


def test_the_guided_evals_hf_spec_passes_its_options_on(monkeypatch):
    import evals.tuned as tuned

    made = {}

    class Fake:
        adapter = "/x/adapters/smollm2"

    def fake_get_backend(name, **kwargs):
        made.update(name=name, **kwargs)
        return Fake()

    monkeypatch.setattr(tuned, "get_backend", fake_get_backend)
    label, _ = tuned.backend_from_spec("hf=;guidance_in_prompt=false")
    assert made == {"name": "hf", "adapter": None, "threads": 2, "guidance_in_prompt": False}
    assert label == "hf:smollm2;guidance_in_prompt=false"
    with pytest.raises(ValueError, match="key=value"):
        tuned.backend_from_spec("hf=;guidance_in_prompt")
