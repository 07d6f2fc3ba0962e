"""Tuning the agent: episodes (deterministic, held-out classes never used, targets = ground truth), the
learned
ranker baseline, the compact overview a tuned backend asks for, and a real 2-step LoRA / prompt-tuning run."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from agent.backends.base import BackendUnavailable
from agent.backends.policy import PolicyBackend
from agent.backends.ranker import RankerBackend, parse_overview_table
from agent.pipeline import InspectionConfig, inspect_scan
from agent.tune.__main__ import main as tune_main
from agent.tune.episode_scans import EpisodeConfig
from agent.tune.episodes import LOWEST_CONFIDENCE, guided_truth, part_episodes, patch_truth
from agent.tune.guidance import PARAPHRASES, make_guidance, paraphrase_ids
from agent.tune.ranker_fit import fit_ranker, save_ranker
from scans.bench import discover_sources
from scans.patches import build_patches
from scans.training_parts import HELD_OUT_CLASSES, TRAINING_PARTS, is_held_out, training_mesh
from tests.tiny import TINY_FIT
from verbalize.compact import COMPACT_ROWS

TINY_EPISODES = EpisodeConfig(
    parts=("tee_plate",),
    points=2500,
    templates=2,
    scans_per_part=4,
    test_share=0.25,
    overview_tokens=1200,
    detector=TINY_FIT,
    normal_target="lowest",  # the empty target is what guided normal scans get
    max_target_ids=6,
    compact_rows=6,  # not the default: the overviews must show what the config asks for
    feature_share=0.0,  # by-design features: tests/test_features.py
)


@pytest.fixture(scope="module")
def episodes() -> list[dict]:
    return [json.loads(e.to_json()) for e in part_episodes("tee_plate", TINY_EPISODES)]


def test_training_parts_are_disjoint_from_the_benchmark_classes():
    benchmark = set(discover_sources()[0])
    assert benchmark, "the benchmark has classes"
    assert not set(TRAINING_PARTS) & (benchmark | HELD_OUT_CLASSES)
    assert all(is_held_out(name) for name in benchmark)
    with pytest.raises(ValueError, match="held out"):
        training_mesh("gear")


def test_episodes_refuse_a_benchmark_class(tmp_path, capsys):
    assert tune_main(["episodes", "--out", str(tmp_path / "eps"), "--parts", "flange"]) == 2
    assert "flange" in capsys.readouterr().err
    assert not (tmp_path / "eps").exists()


@pytest.mark.parametrize("flag", ["--max-target-ids", "--compact-rows"])
def test_episodes_refuse_a_count_of_zero(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as stop:
        tune_main(["episodes", "--out", str(tmp_path / "eps"), flag, "0"])
    assert stop.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "eps").exists()


def test_episodes_are_deterministic(episodes):
    again = [json.loads(e.to_json()) for e in part_episodes("tee_plate", TINY_EPISODES)]
    assert again == episodes
    other = replace(TINY_EPISODES, seed=1)
    assert [json.loads(e.to_json()) for e in part_episodes("tee_plate", other)] != episodes


def test_targets_follow_ground_truth_and_guidance(episodes):
    assert {e["split"] for e in episodes} == {"train", "test"}
    for e in episodes:
        call = e["target"]["tool_calls"][0]["function"]
        assert call["name"] == "report_suspects"
        regions = json.loads(call["arguments"])["regions"]
        named = [pid for r in regions for pid in r["patch_ids"]]
        g = e["guidance"]
        rows = {int(r["id"]): r for r in parse_overview_table(e["messages"][1]["content"])[0]}
        if e["defect"] is None and g is None:  # a normal scan: its top shown patch, for the bank to clear
            top = max(rows.values(), key=lambda r: r["cue"])
            assert regions == [{**regions[0], "patch_ids": [int(top["id"])], "confidence": LOWEST_CONFIDENCE}]
            assert e["truth_patches"] == []
            continue
        assert set(named) <= set(e["truth_patches"])
        assert bool(named) == bool(e["truth_patches"])
        assert len(named) == min(len(set(e["truth_patches"]) & set(rows)), TINY_EPISODES.max_target_ids)
        if e["defect"] is None:
            assert regions == []
        if g is None:
            assert "GUIDANCE" not in e["messages"][1]["content"]
            continue
        assert g["text"] in e["messages"][1]["content"]
        assert g["paraphrase"] in paraphrase_ids(g["kind"], e["split"])
        if g["kind"] == "only_kind" and g["defect_kind"] != e["defect"]:
            assert regions == []
        if g["kind"] == "ignore_region":
            for pid in named:
                coordinate = rows[pid][g["axis"]]
                assert not (coordinate > g["value"] if g["above"] else coordinate < g["value"])
    unguided = {e["id"]: e for e in episodes if e["guidance"] is None}
    assert any(e["defect"] for e in unguided.values())


def test_guidance_changes_the_target_to_match():
    table = SimpleNamespace(columns={"x": np.array([-0.5, 0.5]), "y": np.zeros(2), "z": np.zeros(2)})
    ignore_right = make_guidance("ignore_region", 0, axis="x", above=True, value=0.0)
    assert guided_truth(table, [0, 1], "bulge", ignore_right) == [0]
    only_holes = make_guidance("only_kind", 0, defect_kind="hole")
    assert guided_truth(table, [0, 1], "bulge", only_holes) == []
    assert guided_truth(table, [0, 1], "hole", only_holes) == [0, 1]
    assert guided_truth(table, [0, 1], "bulge", make_guidance("normal_feature", 0)) == [0, 1]


def test_paraphrases_for_testing_are_never_used_in_training():
    for kind, texts in PARAPHRASES.items():
        train, test = set(paraphrase_ids(kind, "train")), set(paraphrase_ids(kind, "test"))
        assert train and test and not train & test and train | test == set(range(len(texts)))


def test_patch_truth_takes_patches_with_enough_labelled_points(rng):
    points = rng.normal(size=(400, 3))
    patches = build_patches(points, 8, seed=0)
    labels = np.zeros(400, dtype=bool)
    members = patches.points_of([3])
    labels[members[: len(members) // 2]] = True  # half of patch 3
    labels[patches.points_of([5])[:1]] = True  # one point of patch 5
    assert patch_truth(patches, labels, 0.2) == [3]
    assert patch_truth(patches, np.zeros(400, dtype=bool), 0.2) == []


def _table_text(rows: list[list[float]], total: int) -> str:
    header = "id x y z n_points z_curvature z_roughness z_spacing z_recon_error_mean z_recon_error_max cue"
    lines = [" ".join(f"{v:.2f}" if i else str(int(v)) for i, v in enumerate(r)) for r in rows]
    return f"# Scan overview\nPoints: {total}.\n\n## Patch table\n{header}\n" + "\n".join(lines) + "\n"


def _planted_episode(rng: np.random.Generator, planted: int | None, n: int = 12) -> dict:
    rows = []
    for pid in range(n):
        z = rng.normal(size=5)
        if pid == planted:
            z[3] += 6.0
            z[4] += 5.0
        rows.append([pid, *rng.uniform(-1, 1, 3), 100, *z, float(np.maximum(z, 0).mean())])
    return {
        "guidance": None,
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": _table_text(rows, 100 * n)},
        ],
        "truth_patches": [] if planted is None else [planted],
    }


def test_ranker_trains_and_ranks_a_planted_anomaly_first(tmp_path, rng):
    train = [_planted_episode(rng, int(rng.integers(12)) if i % 4 else None) for i in range(40)]
    path = save_ranker(fit_ranker(train), tmp_path)
    backend = RankerBackend(model=path)
    test = _planted_episode(rng, 7)
    assert backend.ranked(test["messages"])[0][0] == 7
    tools = [{"type": "function", "function": {"name": "report_suspects", "parameters": {}}}]
    regions = json.loads(backend.chat(test["messages"], tools).tool_calls[0].arguments)["regions"]
    assert regions[0]["patch_ids"][0] == 7
    assert json.loads(path.read_text())["format"] == "scanagent-patch-ranker"

    def named(**options) -> list[int]:  # another operating point names more or fewer of the same order
        reply = RankerBackend(model=path, target_share=1.0, **options).chat(test["messages"], tools)
        return [i for r in json.loads(reply.tool_calls[0].arguments)["regions"] for i in r["patch_ids"]]

    everything, default, f1 = named(threshold=0.0), named(), named(threshold="f1")
    assert len(everything) == 12 and everything[: len(default)] == default and len(default) < 12
    assert default[: len(f1)] == f1 and named(threshold=1.0) == []  # the default (best F2) names more
    model = json.loads(path.read_text())
    assert RankerBackend(model=path).threshold == model["threshold_recall"] <= model["threshold"]
    del model["threshold_recall"]  # a ranker trained before the F2 threshold was kept: best F1, as it was
    path.write_text(json.dumps(model))
    assert RankerBackend(model=path).operating_point == "f1" and named() == f1
    for bad in (-0.1, 1.5, "nan", "high"):
        with pytest.raises(BackendUnavailable, match="threshold"):
            RankerBackend(model=path, threshold=bad)


def test_ranker_reads_the_real_overview(episodes):
    for e in episodes:
        rows, total = parse_overview_table(e["messages"][1]["content"])
        assert len(rows) == min(e["n_patches"], TINY_EPISODES.compact_rows) and total is not None
    assert TINY_EPISODES.compact_rows != COMPACT_ROWS


def test_the_ranker_keeps_the_row_count_it_was_trained_on(tmp_path, rng):
    train = [_planted_episode(rng, int(rng.integers(12)) if i % 4 else None) for i in range(12)]
    path = save_ranker(fit_ranker(train, verbalization="compact", compact_rows=12), tmp_path)
    assert RankerBackend(model=path).compact_rows == 12
    data = json.loads(path.read_text())
    data["compact_rows"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(BackendUnavailable, match="compact_rows"):
        RankerBackend(model=path)


class CompactPolicy(PolicyBackend):
    overview_tokens = 900


def test_a_backend_trained_on_a_compact_overview_gets_it(fitted, scan, analysis):
    config = InspectionConfig(token_budget=3000)
    full = inspect_scan(scan, fitted, PolicyBackend(), config=config, analysis=analysis)
    compact = inspect_scan(scan, fitted, CompactPolicy(), config=config, analysis=analysis)
    assert compact.patches.n_patches < full.patches.n_patches


# -- real model: a 2-step LoRA run and a 1-step prompt-tuning run on 2 tiny episodes
# --------------------------------
@pytest.fixture(scope="module")
def base_backend():
    from agent.backends.hf_backend import HFBackend

    try:
        return HFBackend(threads=1, adapter="none")  # the base model, not the shipped adapter
    except BackendUnavailable as err:
        pytest.skip(str(err))


def _last_logits(backend, text: str):
    import torch

    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return backend.model(input_ids=torch.tensor([ids])).logits[0, -1]


def _short(episode: dict) -> dict:
    """The episode with its system prompt and overview cut to their first lines: a training step on 2 cores
    stays
    a few seconds, and the mechanics (target tokens, adapter files, loading) are the same."""
    system, overview = (m["content"] for m in episode["messages"][:2])
    lines = overview.split("\n")
    kept = lines[:12]
    if "<<<GUIDANCE" in lines:  # the guidance section stays
        kept += lines[lines.index("<<<GUIDANCE") : lines.index("GUIDANCE>>>") + 1]
    return {
        **episode,
        "messages": [
            {"role": "system", "content": system.split("\n")[0]},
            {"role": "user", "content": "\n".join(kept)},
        ],
    }


def _train(tmp_path, episodes, base_backend, method: str, steps: int, target: str = "decisions"):
    from agent.tune.train import TrainConfig, train_adapter

    short = [_short(e) for e in episodes[:2]]
    folder = tmp_path / "episodes"
    folder.mkdir(exist_ok=True)
    (folder / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in short))
    manifest = {"config": {"overview_tokens": 1200, "compact_rows": TINY_EPISODES.compact_rows}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / method
    recipe = train_adapter(
        folder,
        out,
        TrainConfig(method=method, steps=steps, threads=1, lr=1e-2, target=target, row_question="line"),
        episodes=short,
        backend_factory=lambda: base_backend,
    )
    return out, recipe, short


@pytest.mark.slow
@pytest.mark.llm
def test_two_lora_steps_write_a_loadable_adapter_that_changes_the_logits(tmp_path, episodes, base_backend):
    from agent.backends.hf_backend import HFBackend

    short = _short(episodes[0])
    text = base_backend.prompt(short["messages"], short["tools"])
    before = _last_logits(base_backend, text)
    out, recipe, _ = _train(tmp_path, episodes, base_backend, "lora", steps=2)
    assert recipe["steps_done"] == 2 and recipe["overview_tokens"] == 1200
    assert recipe["compact_rows"] == TINY_EPISODES.compact_rows  # the overview it learned on, kept
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.json", "SHA256SUMS"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "adapter_model.safetensors").stat().st_size < 20e6
    # our model card and the base model's file name, not peft's empty template and this machine's cache path
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == recipe["base_model"] and "/" not in recipe["base_model"]
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card and recipe["episodes_sha256"] in card
    assert "README.md" in (out / "SHA256SUMS").read_text()
    tuned = HFBackend(threads=1, adapter=str(out))
    assert tuned.overview_tokens == 1200 and tuned.compact_rows == TINY_EPISODES.compact_rows
    after = _last_logits(tuned, text)
    assert float((after - before).abs().max()) > 1e-4
    # trained on the report decision alone (the default target) it reports at once; the base model after 3
    assert recipe["config"]["target"] == "decisions" and tuned.report_after == 0
    base = HFBackend(threads=1, adapter="none")
    assert base.adapter is None and base.report_after == 3 and base.compact_rows is None
    # it never learned to write a reason, so a region's reason quotes the overview row of its first patch
    assert tuned.reasons == "statistics" and base.reasons == "model"
    tuned.empty_arrays = False  # made to name a region, so there is a reason to check
    regions = json.loads(tuned.chat(short["messages"], short["tools"]).tool_calls[0].arguments)["regions"]
    assert regions and all(
        r["reason"].startswith(f"overview row of patch {r['patch_ids'][0]}: ") for r in regions
    )


@pytest.mark.slow
@pytest.mark.llm
def test_a_prompt_tuned_adapter_decodes_incrementally_like_from_scratch(tmp_path, episodes, base_backend):
    from agent.backends.hf_backend import HFBackend
    from agent.backends.hf_decoder import Decoder as _Decoder

    out, _, short = _train(tmp_path, episodes, base_backend, "prompt", steps=1)
    tuned = HFBackend(threads=1, adapter=str(out))
    text = tuned.prompt(short[0]["messages"], short[0]["tools"])

    def decoder():
        dec = _Decoder(tuned.model, tuned.tokenizer, tuned.torch)
        dec._forward = tuned._forward_override.__get__(dec)
        return dec

    stepwise, fresh = decoder(), decoder()
    for part in (text[:-100], text[:-150], text):  # the shorter crops the cache, keeping the virtual tokens
        stepwise.set_text(part)
        stepwise.flush()
    fresh.set_text(text)
    fresh.flush()
    assert float((stepwise.last_logits - fresh.last_logits).abs().max()) < 1e-3
    # choices over a prefix tree (one pass, a 4-D mask) score as one continuation at a time from scratch
    ids = [str(i) for i in range(12)]
    together = fresh.loglikelihoods([i + "," for i in ids])
    alone = [decoder() for _ in ids[:3]]
    for dec in alone:
        dec.set_text(text)
    assert max(abs(d.loglikelihood(i + ",") - t) for d, i, t in zip(alone, ids, together)) < 1e-3
    base = _Decoder(base_backend.model, base_backend.tokenizer, base_backend.torch)
    base.set_text(text)
    base.flush()
    assert float((fresh.last_logits - base.last_logits).abs().max()) > 1e-4
    reply = tuned.chat(short[0]["messages"], short[0]["tools"])
    assert reply.tool_calls and json.loads(reply.tool_calls[0].arguments) is not None


def test_episodes_from_your_own_normal_scans(tmp_path, capsys):
    from agent.tune.episode_scans import folder_part_scans
    from scans.io import write_pcd
    from tests.tiny import part_scans as tiny_scans

    folder = tmp_path / "my_part"
    folder.mkdir()
    assert tune_main(["episodes", "--out", str(tmp_path / "eps"), "--normals", str(folder)]) == 2
    assert str(folder) in capsys.readouterr().err and not (tmp_path / "eps").exists()
    for i, points in enumerate(tiny_scans(8, 1500, seed=3)):
        write_pcd(folder / f"scan{i}.pcd", points)
    config = replace(TINY_EPISODES, templates=2, normal_share=0.3, test_share=0.34)
    templates, scans = folder_part_scans(folder, config)
    assert len(templates) == 2 and len(scans) == 6
    assert {s.split for s in scans} == {"train", "test"}
    assert all(s.labels.any() == (s.defect is not None) for s in scans)  # synthesized defects are labelled
    assert any(s.defect is not None for s in scans)


def test_a_severity_range_makes_subtler_defects_and_changes_nothing_else():
    """--severity LOW HIGH: the same scans, kinds and split; a defect drawn below 1 labels fewer points than
    the benchmark's (severity 1), normal scans are the same; a range outside (0, 4] is refused."""
    from agent.tune.episode_scans import part_scans

    config = replace(TINY_EPISODES, scans_per_part=6, normal_share=0.2)
    _, fixed = part_scans("tee_plate", config)
    _, subtle = part_scans("tee_plate", replace(config, severity=(0.3, 0.5)))
    assert [(s.name, s.defect, s.split) for s in fixed] == [(s.name, s.defect, s.split) for s in subtle]
    defective = [(a, b) for a, b in zip(fixed, subtle, strict=True) if a.defect is not None]
    assert defective and all(b.labels.sum() < a.labels.sum() for a, b in defective)
    for a, b in zip(fixed, subtle, strict=True):
        if a.defect is None:
            assert np.array_equal(a.points, b.points)
    for bad in ((0.0, 1.0), (1.0, 0.5), (1.0, 5.0)):
        with pytest.raises(ValueError, match="severity"):
            replace(config, severity=bad)


@pytest.mark.llm
def test_choices_scored_over_a_prefix_tree_match_full_recomputation(base_backend):
    """The decoder scores a choice's candidates in one pass over their prefix tree (a 4-D mask, own
    position ids) on top of its KV cache; each score must equal log P(candidate | text) computed from
    scratch, the continuation that merges with the text's last token ("[" + "]" -> "[]") included, and the
    cache must hold the text again afterwards."""
    from agent.backends.hf_decoder import Decoder

    torch, model, tok = base_backend.torch, base_backend.model, base_backend.tokenizer
    text = "<|im_start|>user\nPatches: " + ", ".join(f"{i}: {i * 0.37 % 3:.2f}" for i in range(30))
    text += "<|im_end|>\n<|im_start|>assistant\n" + '{"regions": ['

    def from_scratch(continuation: str) -> float:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        full = tok(text + continuation, add_special_tokens=False)["input_ids"]
        common = next((k for k, (a, b) in enumerate(zip(ids, full)) if a != b), min(len(ids), len(full)))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), dim=-1)
        return float(sum(logprobs[k - 1, full[k]] for k in range(max(common, 1), len(full))))

    dec = Decoder(model, tok, torch)
    dec.set_text(text)
    candidates = ["]", "{", '{"patch_ids": [7', "", *(f"{i}," for i in range(25))]
    scores = dec.loglikelihoods(candidates)
    for candidate, score in zip(candidates[:8], scores):
        assert abs(score - from_scratch(candidate)) < 1e-3, candidate
    assert scores[3] == 0.0
    fresh = Decoder(model, tok, torch)
    fresh.set_text(text)
    fresh.flush()
    assert dec.cache.get_seq_length() == len(dec.ids) == len(fresh.ids)
    assert float((dec.last_logits - fresh.last_logits).abs().max()) < 1e-3


def test_train_tunes_the_base_model_not_the_shipped_adapter(tmp_path, episodes, monkeypatch):
    """A LoRA trained on top of the shipped adapter (merged into the weights) is a delta that means nothing
    on the base model it is loaded onto: until this was caught, retrained adapters behaved like the base."""
    import agent.backends.hf_backend as hf_backend
    import agent.tune.train as train_module

    built: list[dict] = []

    class Recorder:
        def __init__(self, **kwargs):
            built.append(kwargs)

    def fake_train(episodes_dir, out, config, *, episodes, backend_factory, progress=None):
        backend_factory()
        return {"steps_done": 0, "seconds": 0.0, "loss_last10": []}

    monkeypatch.setattr(hf_backend, "HFBackend", Recorder)
    monkeypatch.setattr(train_module, "train_adapter", fake_train)
    monkeypatch.setattr(train_module, "adapter_digest", lambda out: "")
    folder = tmp_path / "episodes"
    folder.mkdir()
    (folder / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    assert tune_main(["train", "--episodes", str(folder), "--out", str(tmp_path / "lora")]) == 0
    assert built and built[0].get("adapter") == "none"


# -- a yes/no per shown row (target rows): the same numbers in training and use, and the report they make
# --------------------------------
def test_rows_are_chosen_over_the_threshold_within_the_share():
    from agent.backends.overview import select_rows

    ranked = [(4, 3.0, {"n_points": 50.0}), (2, 1.0, {"n_points": 60.0}), (9, 0.5, {"n_points": 10.0})]
    assert [r[0] for r in select_rows(ranked, 0.8, 20, 1.0, 1000)] == [4, 2]  # 9 is under the threshold
    assert [r[0] for r in select_rows(ranked, 0.0, 20, 0.1, 1000)] == [4]  # 110 of 1000 points > 10%
    assert [r[0] for r in select_rows(ranked, 0.0, 2, 1.0, 1000)] == [4, 2]  # the id limit
    assert select_rows(ranked, 5.0, 20, 1.0, 1000) == []
    # the first row is named even when it alone is over the share
    assert [r[0] for r in select_rows(ranked, 0.0, 20, 0.01, 1000)] == [4]


def test_the_f1_threshold_separates_the_classes():
    from agent.tune.ranker_fit import f1_threshold

    threshold, f1 = f1_threshold(np.array([0, 0, 1, 1, 0]), np.array([-2.0, -1.0, 1.5, 2.0, 0.5]))
    assert threshold == 1.5 and f1 == 1.0


def test_recall_weighted_twice_cuts_lower_where_a_target_scores_low():
    from agent.backends.overview import operating_threshold
    from agent.tune.ranker_fit import f1_threshold, fbeta_threshold

    labels = np.array([0, 0, 1, 1, 0, 1, 0])  # one target (0.2) scores below two normal rows (0.5, 0.4)
    scores = np.array([-2.0, 0.4, 1.5, 2.0, 0.5, 0.2, -0.5])
    assert f1_threshold(labels, scores)[0] == 1.5  # F1: leave the low target out (2 of 3, no false row)
    threshold, f2 = fbeta_threshold(labels, scores, 2.0)
    assert threshold == 0.2 and f2 == pytest.approx(5 * 0.6 / (4 * 0.6 + 1))  # F2: take it, two false rows
    assert operating_threshold(None, 1.5, 0.2, "m") == (0.2, "recall")
    assert operating_threshold(None, 1.5, None, "m") == (1.5, "f1")  # a file from before: as it was
    assert operating_threshold("f1", 1.5, 0.2, "m") == (1.5, "f1")
    assert operating_threshold("-0.5", 1.5, 0.2, "m") == (-0.5, "given")
    for option, recall in [("recall", None), ("half", 0.2), (float("nan"), 0.2), (None, float("inf"))]:
        with pytest.raises(ValueError, match="m"):
            operating_threshold(option, 1.5, recall, "m")


def test_a_row_question_names_the_patch_or_quotes_its_line(episodes):
    from agent.backends.hf_rows import row_questions
    from agent.backends.overview import overview_text, table_lines

    overview = overview_text(episodes[0]["messages"])
    rows, _ = parse_overview_table(overview)
    ids, by_id = row_questions("id", overview)
    assert ids == [int(r["id"]) for r in rows] and by_id[0] == f"Patch {ids[0]}: defect?"
    lines = table_lines(overview)
    assert list(lines) == ids and all(f"\n{line}\n" in overview for line in lines.values())
    ids_line, quoted = row_questions("line", overview)
    assert ids_line == ids and quoted[0] == f"Row {lines[ids[0]]} -> defect?"
    assert lines[ids[0]].split()[0] == str(ids[0])  # a quoted line starts with its patch id
    with pytest.raises(ValueError, match="unknown row question"):
        row_questions("sentence", overview)


def test_the_guided_form_repeats_the_guidance_right_before_the_questions(episodes):
    from agent.backends.hf_rows import row_preamble, row_questions
    from agent.backends.overview import overview_text

    guided = next(e for e in episodes if e["guidance"] is not None)
    overview = overview_text(guided["messages"])
    assert row_preamble("guided", overview) == f"Operator guidance: {guided['guidance']['text']}\n"
    assert row_preamble("line", overview) == "" and row_preamble("id", overview) == ""
    plain = next(e for e in episodes if e["guidance"] is None)
    assert row_preamble("guided", overview_text(plain["messages"])) == ""
    assert row_questions("guided", overview) == row_questions("line", overview)


def test_a_row_branch_sees_the_prompt_and_itself_only():
    import torch

    from agent.tune.row_training import tree_inputs

    mask, positions, ends = tree_inputs(torch, 3, [[7, 8], [9, 10, 11]], torch.float32)
    seen = mask[0, 0] == 0
    assert positions.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]] and ends == [4, 7]
    assert seen[2, :3].all() and not seen[1, 2]  # the prompt is causal
    assert seen[4, :5].all() and not seen[4, 5:].any()  # branch 1: prompt + itself
    assert seen[7, :3].all() and not seen[7, 3:5].any() and seen[7, 5:8].all()  # branch 2 never sees 1


@pytest.mark.slow
@pytest.mark.llm
def test_rows_training_scores_what_inference_scores_and_reports_over_its_threshold(
    tmp_path, episodes, base_backend
):
    import torch

    from agent.backends.hf_adapter import rows_settings
    from agent.backends.hf_backend import HFBackend
    from agent.backends.hf_rows import ROW_QUESTIONS, row_preamble, row_questions, row_scores
    from agent.backends.overview import overview_text
    from agent.tune import row_training

    short = next(_short(e) for e in episodes if e["truth_patches"] and e["guidance"] is None)
    guided = next(_short(e) for e in episodes if e["guidance"] is not None)
    assert row_preamble("guided", overview_text(guided["messages"])).startswith("Operator guidance: ")
    rows, total = parse_overview_table(overview_text(short["messages"]))
    ids = [int(r["id"]) for r in rows]
    yes_no = row_training.answer_tokens(base_backend.tokenizer)
    # the training's tree pass gives the numbers the decoder scores at inference, guidance preamble included
    for form, episode in [*((f, short) for f in ROW_QUESTIONS), ("guided", guided)]:
        overview = overview_text(episode["messages"])
        (example,), skipped = row_training.row_examples(base_backend, [episode], 3072, form)
        shown = [int(r["id"]) for r in parse_overview_table(overview)[0]]
        assert skipped == 0 and len(example.branches) == len(shown) > 1
        assert example.labels == [int(i in episode["truth_patches"]) for i in shown]
        with torch.no_grad():
            trained = row_training.row_gaps(base_backend.model, torch, example, yes_no)
        base_backend._decoder.set_text(before := base_backend.prompt(episode["messages"], episode["tools"]))
        questions = row_questions(form, overview)[1]
        inferred = row_scores(base_backend._decoder, questions, row_preamble(form, overview))
        assert np.allclose(trained.numpy(), inferred, atol=1e-3)
        assert base_backend._decoder.text == before  # the preamble is taken off again
    questions = row_questions("line", overview_text(short["messages"]))[1]
    with pytest.raises(ValueError, match="LoRA"):
        _train(tmp_path, episodes, base_backend, "prompt", steps=1, target="rows")
    out, recipe, shorts = _train(tmp_path, episodes, base_backend, "lora", steps=2, target="rows")
    assert recipe["config"]["target"] == "rows" and np.isfinite(recipe["row_threshold"])
    assert recipe["config"]["row_question"] == "line"  # the form of the last pass above, as _train asks
    assert recipe["rows_scored"] == sum(
        len(parse_overview_table(overview_text(e["messages"]))[0]) for e in shorts
    )
    # the operating points: best F2 by default, best F1, a number; a recipe from before F2 was kept gets F1
    assert recipe["row_threshold_recall"] <= recipe["row_threshold"]  # recall weighs more: a lower cut
    assert rows_settings(recipe, "r")[::2] == (recipe["row_threshold_recall"], "recall")
    assert rows_settings(recipe, "r", "f1")[::2] == (recipe["row_threshold"], "f1")
    assert rows_settings(recipe, "r", -2)[::2] == (-2.0, "given")
    older = {k: v for k, v in recipe.items() if not k.startswith("row_threshold_recall")}
    assert rows_settings(older, "r")[::2] == (recipe["row_threshold"], "f1")
    with pytest.raises(BackendUnavailable, match="no recall threshold"):
        rows_settings(older, "r", "recall")
    for bad in ("nan", "low", float("inf")):  # refused before the model loads
        with pytest.raises(BackendUnavailable, match="row_threshold"):
            HFBackend(threads=1, adapter=str(out), row_threshold=bad)
    with pytest.raises(BackendUnavailable, match="trained on rows"):  # the base model has no rows to score
        HFBackend(threads=1, adapter="none", row_threshold=-1.0)
    tuned = HFBackend(threads=1, adapter=str(out))
    assert tuned.row_threshold == recipe["row_threshold_recall"] and tuned.operating_point == "recall"
    assert tuned.report_after == 0
    assert tuned.row_question == "line"
    tuned._decoder.set_text(tuned.prompt(short["messages"], short["tools"]))
    scores = dict(zip(ids, row_scores(tuned._decoder, questions)))
    best = max(ids, key=lambda i: (scores[i], -i))

    def named(threshold: float) -> list[list[int]]:
        tuned.row_threshold = threshold
        reply = tuned.chat(short["messages"], short["tools"])
        assert reply.tool_calls[0].name == "report_suspects"
        return [r["patch_ids"] for r in json.loads(reply.tool_calls[0].arguments)["regions"]]

    assert named(max(scores.values()) + 1.0) == []  # no row reaches it: an empty report
    (region,) = named(min(scores.values()) - 1.0)  # every row does: the best first, within 15% of the points
    assert region[0] == best and set(region) <= set(ids)
    size = {int(r["id"]): r.get("n_points", 0.0) for r in rows}  # the compact table shows no point counts
    assert sum(size[i] for i in region[1:]) <= 0.15 * (total or 0)


def test_the_model_card_gives_the_commands_that_make_the_adapter_again():
    from agent.tune.train import model_card

    recipe = {
        "method": "lora",
        "config": {"target": "rows", "row_question": "line", "steps": 330, "threads": 1, "seed": 0},
        "learning_rate": 0.0005,
        "steps_done": 212,
        "scans_per_part": 20,
        "compact_rows": 12,
        "feature_share": 0.35,
        "row_threshold": -0.39,
        "episodes": "ep13",
    }
    card = model_card(recipe)
    assert (
        "`python -m agent.tune episodes --out EPISODES --scans-per-part 20 --compact-rows 12 "
        "--feature-share 0.35`" in card
    )
    assert (
        "`python -m agent.tune train --episodes EPISODES --out DIR --method lora --target rows "
        "--row-question line --lr 0.0005 --steps 212 --threads 1`" in card
    )
    assert "reaches -0.39" in card
    decisions = model_card(
        {**recipe, "config": {"steps": 330, "threads": 2}, "compact_rows": None, "feature_share": None}
    )
    assert "--target" not in decisions and "--compact-rows" not in decisions
    assert "--feature-share" not in decisions  # episodes made before by-design features
    assert "report_suspects" in decisions
    assert "--severity" not in card  # the recipe says nothing: episodes made before the flag (1 1)
    varied = model_card({**recipe, "severity": [0.3, 1.3]})
    assert "--feature-share 0.35 --severity 0.3 1.3`" in varied
    assert "--severity" not in model_card({**recipe, "severity": [1.0, 1.0]})
