"""By-design features (scans.features) and what guidance naming them does: to the tuning episodes' targets
and to evals.guided's count of false regions on the feature."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.spatial import cKDTree

from agent.tune.episodes import feature_paraphrases, feature_target, names_feature, part_episodes
from agent.tune.guidance import make_guidance, paraphrase_ids
from scans.features import AVOID_DISTANCE, FEATURE_KINDS, RIB_HEIGHT, add_feature
from scans.parts import extent, sample_surface
from scans.training_parts import training_mesh
from tests.test_tune import TINY_EPISODES


@pytest.fixture(scope="module")
def plate() -> tuple[np.ndarray, np.ndarray]:
    return sample_surface(training_mesh("tee_plate"), 4000, 0)


def test_a_rib_rises_out_of_the_surface_and_holes_remove_points(plate):
    points, normals = plate
    size = extent(points)
    moved, mask, labels, _ = add_feature(points, normals, "edges", 1)
    assert moved.shape == points.shape and mask.any() and not labels.any()
    lift = np.einsum("ij,ij->i", moved - points, normals)
    assert np.all(lift >= -1e-9) and lift.max() == pytest.approx(RIB_HEIGHT * size, rel=0.05)
    assert np.all(lift[~mask] <= 0.1 * RIB_HEIGHT * size + 1e-9)  # the mask holds every raised point
    kept, ring, _, kept_normals = add_feature(points, normals, "holes", 1)
    assert len(kept) < len(points) and ring.any() and len(kept_normals) == len(kept)
    again = add_feature(points, normals, "holes", 1)
    assert np.array_equal(again[0], kept) and np.array_equal(again[1], ring)  # deterministic by seed
    varied = [len(add_feature(points, normals, "holes", seed, vary=0.3)[0]) for seed in range(4)]
    fixed = [len(add_feature(points, normals, "holes", seed)[0]) for seed in range(4)]
    assert varied != fixed  # other radii and hole counts than the defaults


def test_a_feature_keeps_away_from_the_defect_and_carries_its_labels(plate):
    points, normals = plate
    size = extent(points)
    labels = np.zeros(len(points), dtype=bool)
    labels[np.argsort(points[:, 0])[:80]] = True  # a "defect" at one end
    for kind in FEATURE_KINDS:
        moved, mask, kept_labels, _ = add_feature(points, normals, kind, 2, labels=labels)
        assert kept_labels.sum() == labels.sum() and not (mask & kept_labels).any()
        distance, _ = cKDTree(moved[kept_labels]).query(moved[mask])
        assert distance.min() > 0.5 * AVOID_DISTANCE * size
    with pytest.raises(ValueError, match="unknown feature kind"):
        add_feature(points, normals, "bosses", 0)


def test_guidance_that_calls_the_feature_normal_takes_it_out_of_the_target():
    table = SimpleNamespace(columns={"x": np.array([-0.5, 0.5]), "y": np.zeros(2), "z": np.zeros(2)})
    for kind in FEATURE_KINDS:
        for split in ("train", "test"):
            assert feature_paraphrases(kind, split)  # every feature can be named in both splits
        naming = make_guidance("normal_feature", feature_paraphrases(kind, "train")[0])
        assert names_feature(naming, kind)
        assert feature_target(table, [0, 1], kind, None) == [0, 1]  # unguided: unusual, so reported
        assert feature_target(table, [0, 1], kind, naming) == []
    other = make_guidance("normal_feature", paraphrase_ids("normal_feature", "test")[0])  # "sharp ridges"
    assert not names_feature(other, "holes") and feature_target(table, [0, 1], "holes", other) == [0, 1]
    only = make_guidance("only_kind", 0, defect_kind="bulge")
    assert feature_target(table, [0, 1], "edges", only) == []  # a feature is no defect of any kind
    right = make_guidance("ignore_region", 0, axis="x", above=True, value=0.0)
    assert feature_target(table, [0, 1], "edges", right) == [0]


@pytest.mark.parametrize("flag", [("--feature-share", "1.5"), ("--guided-per-scan", "-1")])
def test_episode_flags_out_of_range_exit_2_and_write_nothing(tmp_path, capsys, flag):
    from agent.tune.__main__ import main as tune_main

    out = tmp_path / "eps"
    assert tune_main(["episodes", "--out", str(out), *flag]) == 2
    assert flag[0][2:].replace("-", "_") in capsys.readouterr().err and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_training_scans_get_features_and_the_guided_target_drops_them():
    config = replace(TINY_EPISODES, feature_share=1.0, scans_per_part=5, test_share=0.2)
    episodes = [json.loads(e.to_json()) for e in part_episodes("tee_plate", config)]
    assert all(e["feature"] is None for e in episodes if e["split"] == "test")  # evals.guided adds its own
    train = [e for e in episodes if e["split"] == "train"]
    assert train and all(e["feature"] in FEATURE_KINDS for e in train)
    plain = {e["scan"]: e for e in train if e["guidance"] is None}
    assert any(e["feature_patches"] for e in plain.values())
    for e in train:
        truth, features = set(e["truth_patches"]), set(e["feature_patches"])
        if e["guidance"] is None:
            assert features <= truth
        elif e["guidance"]["kind"] == "normal_feature" and e["feature"] in _named(e["guidance"]["text"]):
            assert not features & truth
            assert truth == set(plain[e["scan"]]["truth_patches"]) - features


def _named(text: str) -> tuple[str, ...]:
    from agent.guidance import read_guidance

    return read_guidance(text, False).normal_features


def test_the_guided_eval_counts_false_regions_on_an_added_feature(tmp_path):
    from agent.backends.base import LLMReply, ToolCall
    from agent.backends.ranker import overview_text, parse_overview_table
    from agent.guidance import guidance_in_messages
    from agent.tune.episodes import EPISODES_FILE, MANIFEST_FILE
    from evals.guided import evaluate
    from tests.scripted import ScriptedBackend

    config = replace(TINY_EPISODES, scans_per_part=4, test_share=0.5)
    out = tmp_path / "eps"
    out.mkdir()
    with (out / EPISODES_FILE).open("w") as handle:
        for episode in part_episodes("tee_plate", config, out=out):
            handle.write(episode.to_json() + "\n")
    (out / MANIFEST_FILE).write_text(json.dumps({"config": config.to_dict()}))

    def every_row_unless_guided(messages, tools):  # a region per shown row; nothing once guided
        rows, _ = parse_overview_table(overview_text(messages))
        guided = guidance_in_messages(messages) is not None
        regions = (
            [] if guided else [{"patch_ids": [int(r["id"])], "reason": "r", "confidence": 0.9} for r in rows]
        )
        arguments = json.dumps({"regions": regions})
        return LLMReply(tool_calls=[ToolCall(id="c0", name="report_suspects", arguments=arguments)])

    scripted = ("every-row", ScriptedBackend([every_row_unless_guided], repeat_last=True))
    result = evaluate(out, [scripted], log=lambda *_: None)
    assert sum(result["features"].values()) == result["scans"] == 2
    read = result["backends"]["every-row"]["normal_feature"]
    assert read["runs"] == 2  # one held-out paraphrase names each feature
    assert result["backends"]["every-row"]["paraphrases_read"]["normal_feature"] == 1.0
    assert (
        read["false_regions_on_feature"]["unguided"] >= 1 and read["false_regions_on_feature"]["guided"] == 0
    )
    assert read["fall"] == 1.0
    named = read["feature_patches_named"]
    assert named["unguided"] >= read["false_regions_on_feature"]["unguided"] and named["guided"] == 0
    assert read["recall_on_defects"] == {"unguided": 1.0, "guided": 0.0}


def _feature_episode(
    rng: np.random.Generator, defect: int, feature: int | None, guidance: str | None
) -> dict:
    """A table of 12 rows: a defect row (high recon error) and maybe a "holes" row (high spacing, recon error
    raised less), as the planted episodes of test_tune do."""
    from tests.test_tune import _table_text

    rows = []
    for pid in range(12):
        z = rng.normal(scale=0.5, size=5)
        if pid == defect:
            z[3:] += (6.0, 5.0)
        if pid == feature:
            z[2] += 6.0
            z[3:] += (3.0, 3.0)
        rows.append([pid, *rng.uniform(-1, 1, 3), 100, *z, float(np.maximum(z, 0).mean())])
    text = _table_text(rows, 1200)
    if guidance is not None:
        text += f"\n## Operator guidance\n<<<GUIDANCE\n{guidance}\nGUIDANCE>>>\n"
    return {
        "guidance": None if guidance is None else {"kind": "normal_feature", "text": guidance},
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": text}],
        "truth_patches": [defect] + ([] if feature is None else [feature]),
        "feature": None if feature is None else "holes",
        "feature_patches": [] if feature is None else [feature],
    }


def test_the_ranker_learns_what_a_named_feature_looks_like(tmp_path, rng):
    from agent.backends.ranker import RankerBackend
    from agent.tune.ranker_fit import fit_ranker, save_ranker

    train = [_feature_episode(rng, i % 12, (i + 5) % 12 if i % 2 else None, None) for i in range(60)]
    model = fit_ranker(train)
    assert set(model["normal_features"]) == {"holes"} and model["normal_features"]["holes"]["rows"] == 30
    backend = RankerBackend(model=save_ranker(model, tmp_path))
    plain = _feature_episode(rng, 3, 8, None)
    assert {pid for pid, *_ in backend.ranked(plain["messages"])[:2]} == {3, 8}  # unguided: both unusual
    guided = _feature_episode(rng, 3, 8, "The bolt holes are by design.")
    ranked = [pid for pid, *_ in backend.ranked(guided["messages"])]
    assert ranked[0] == 3 and 8 not in ranked  # the feature's row is recognised and dropped
    reading = backend.guidance_reading(guided["messages"])
    assert reading["learned_recognisers"] == ["holes"] and "learned recogniser" in reading["applied"]
    assert "spacing" not in reading["applied"]  # not agent.guidance's hand-written statistics
