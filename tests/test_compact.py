"""The compact overview for small models (verbalize.compact): its length, what it keeps, who gets it, and the
tuned hf adapter's command-line contract (`agent.run --adapter`)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import agent.run as run_cli
from agent.backends.policy import PolicyBackend
from agent.backends.ranker import parse_overview_table
from agent.pipeline import InspectionConfig, build_conversation, inspect_scan
from scans.io import write_pcd
from verbalize import describe_scan, estimate_tokens, render_overview
from verbalize.compact import (
    COMPACT_ROWS,
    COMPACT_TOKEN_BUDGET,
    compact_token_budget,
    render_compact_overview,
)


def _scan(n: int = 30_000, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n, 3)).astype(np.float32)
    stats = {name: rng.random(n) for name in ("recon_error", "feature_norm", "feature_deviation")}
    return points, stats


@pytest.fixture(scope="module")
def table():
    points, stats = _scan()
    return describe_scan(points, stats, token_budget=3000)[1]


def test_compact_overview_fits_its_budget_where_the_full_one_does_not(table):
    full = render_overview(table, token_budget=3000)
    compact = render_compact_overview(table, guidance="sharp ridges are normal")
    assert estimate_tokens(full) > 2 * COMPACT_TOKEN_BUDGET
    without_guidance = render_compact_overview(table)
    assert estimate_tokens(without_guidance) <= COMPACT_TOKEN_BUDGET
    rows, total = parse_overview_table(compact)
    assert 0 < len(rows) <= COMPACT_ROWS and total == 30_000
    cue = table.columns["cue"]
    top = set(np.argsort(-cue, kind="stable")[: len(rows)].tolist())
    assert {int(r["id"]) for r in rows} == top  # the highest-cue patches, the rest only summarised
    assert "sharp ridges are normal" in compact


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the hf extra")
def test_compact_overview_is_at_most_1024_model_tokens(table):
    from agent.backends.hf_loading import _dequantized_dir, packaged_gguf

    try:
        gguf = packaged_gguf()
    except Exception as err:  # the packaged model is not installed
        pytest.skip(str(err))
    from transformers import AutoTokenizer

    folder = _dequantized_dir(gguf)
    if (folder / "tokenizer.json").is_file():  # converted by an earlier hf run
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:  # the model's own tokenizer, read from the GGUF (no weights dequantized)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = render_compact_overview(table, guidance="Look only for dents; ignore the rest.")
    assert len(tokenizer(text)["input_ids"]) <= 1024


def test_more_rows_get_a_larger_budget_and_are_all_shown(table):
    assert table.n_patches > 12
    rows, _ = parse_overview_table(render_compact_overview(table, rows=12))
    assert len(rows) == 12
    cue = table.columns["cue"]
    assert [int(r["id"]) for r in rows] == np.argsort(-cue, kind="stable")[:12].tolist()
    assert compact_token_budget(COMPACT_ROWS) == COMPACT_TOKEN_BUDGET < compact_token_budget(12)
    eight_rows = estimate_tokens(render_compact_overview(table, rows=8))
    squeezed = render_compact_overview(table, rows=12, token_budget=eight_rows)
    assert len(parse_overview_table(squeezed)[0]) == 8  # an explicit budget still drops rows to fit
    with pytest.raises(ValueError, match="at least one row"):
        render_compact_overview(table, rows=0)


def test_a_small_statistic_that_never_varies_is_left_out(table):
    constant = describe_scan(*_with_constant_stat(), token_budget=3000)[1]
    header = next(line for line in render_compact_overview(constant).splitlines() if line.startswith("id "))
    assert "z_flat_max" not in header and "z_recon_error_max" in header


def _with_constant_stat():
    points, stats = _scan(5000, seed=1)
    return points, {"recon_error": stats["recon_error"], "flat": np.ones(len(points))}


class CompactReader(PolicyBackend):
    verbalization = "compact"


class TwelveRowReader(CompactReader):
    compact_rows = 12  # as an adapter's recipe or a ranker model trained on 12-row overviews declares


def test_a_backend_that_reads_the_compact_overview_gets_it(fitted, scan, analysis):
    config = InspectionConfig(token_budget=3000, verbalization="compact")
    _, _, _, messages = build_conversation(scan, fitted, analysis, config, np.zeros(len(scan), dtype=bool))
    assert "patches with the highest cue" in messages[1]["content"]
    assert "Tools:" not in messages[0]["content"]  # the compact system prompt; the backend lists the tools
    full = inspect_scan(scan, fitted, PolicyBackend(), config=InspectionConfig(), analysis=analysis)
    compact = inspect_scan(scan, fitted, CompactReader(), config=InspectionConfig(), analysis=analysis)
    assert compact.patches.n_patches == full.patches.n_patches  # same patches, a shorter text


def test_a_backend_trained_on_more_rows_gets_them(fitted, scan, analysis, tmp_path):
    transcripts = {}
    for backend in (CompactReader(), TwelveRowReader()):
        path = tmp_path / f"{type(backend).__name__}.jsonl"
        config = InspectionConfig()
        inspect_scan(scan, fitted, backend, config=config, analysis=analysis, transcript_path=path)
        transcripts[type(backend).__name__] = path.read_text()
    shown = {}
    for name, text in transcripts.items():
        start = next(json.loads(line) for line in text.splitlines() if "messages" in json.loads(line))
        shown[name] = len(parse_overview_table(start["messages"][1]["content"])[0])
    assert shown == {"CompactReader": COMPACT_ROWS, "TwelveRowReader": 12}


# -- agent.run --adapter
# ------------------------------------------------------------------------------------------
@pytest.fixture
def one_scan(tmp_path, scan):
    return write_pcd(tmp_path / "part.pcd", scan)


def test_adapter_needs_the_hf_backend(one_scan, tmp_path, capsys):
    assert run_cli.main([str(one_scan), "--out", str(tmp_path / "out"), "--adapter", "none"]) == 2
    assert "--adapter is for --backend hf" in capsys.readouterr().out


def test_a_bad_adapter_folder_exits_2_naming_it(one_scan, tmp_path, capsys):
    missing = tmp_path / "no-such-adapter"
    argv = [str(one_scan), "--out", str(tmp_path / "out"), "--backend", "hf", "--adapter", str(missing)]
    assert run_cli.main(argv) == 2
    assert str(missing) in capsys.readouterr().out
    not_peft = tmp_path / "empty"
    not_peft.mkdir()
    assert run_cli.main(argv[:-1] + [str(not_peft)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_an_adapter_whose_file_changed_exits_2_naming_the_file(one_scan, tmp_path, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    from agent.backends.hf_adapter import file_sha256

    names = ("adapter_config.json", "adapter_model.safetensors")
    sums = "".join(f"{file_sha256(folder / n)}  {n}\n" for n in names)
    (folder / "SHA256SUMS").write_text(sums)
    (folder / "adapter_model.safetensors").write_bytes(b"other weights")
    argv = [str(one_scan), "--out", str(tmp_path / "out"), "--backend", "hf", "--adapter", str(folder)]
    assert run_cli.main(argv) == 2
    out = capsys.readouterr().out
    assert "adapter_model.safetensors" in out and "checksum" in out


@pytest.mark.slow
@pytest.mark.llm
def test_the_shipped_adapter_loads_by_default_and_reports_on_a_scan(fitted, scan, analysis):
    from agent.backends.base import BackendUnavailable
    from agent.backends.hf_adapter import packaged_adapter

    shipped = packaged_adapter()
    assert shipped is not None, "the package ships an adapter (agent/backends/adapters/)"
    assert (shipped / "adapter_model.safetensors").stat().st_size <= 20e6
    from agent.backends.hf_backend import HFBackend

    try:
        backend = HFBackend(threads=2, report_after=1)  # one tool round: loading and reporting
    except BackendUnavailable as err:
        pytest.skip(str(err))
    assert backend.adapter == str(shipped) and backend.verbalization == "compact"
    inspection = inspect_scan(scan, fitted, backend, analysis=analysis, use_fallback=False)
    assert inspection.outcome.error is None and not inspection.outcome.fallback_used
    assert inspection.report()["reporting_backend"] == "hf"
    # by default guidance is kept out of its prompt: the model does not read it, the report filter applies it
    assert backend.guidance_in_prompt is False and backend.uses_guidance is False
    config = InspectionConfig(guidance="Ignore x above -0.5.")
    shielded = inspect_scan(scan, fitted, backend, config=config, analysis=analysis, use_fallback=False)
    assert shielded.guidance["used"] is False and "still applied" in shielded.guidance["note"]
    x = shielded.table.columns["x"]
    assert all(x[p] <= -0.5 for r in shielded.outcome.regions for p in r["patch_ids"])


def test_a_rows_adapter_without_its_threshold_or_with_an_unknown_question_exits_2(one_scan, tmp_path, capsys):
    """A rows adapter's recipe (resealed, so the checksums pass) that lacks what scoring needs is refused
    with the folder check, before the model loads."""
    import shutil

    from agent.backends.hf_adapter import packaged_adapter
    from agent.tune.train import finish_adapter_dir

    shipped = packaged_adapter()
    if shipped is None or json.loads((shipped / "recipe.json").read_text())["config"]["target"] != "rows":
        pytest.skip("the package ships no rows adapter")
    for n, change in enumerate(
        ({"row_threshold": None}, {"config": {"target": "rows", "row_question": "sentence"}})
    ):
        folder = tmp_path / f"rows{n}"
        shutil.copytree(shipped, folder)
        recipe = json.loads((folder / "recipe.json").read_text())
        recipe.update(change)
        finish_adapter_dir(folder, recipe)
        argv = [str(one_scan), "--out", str(tmp_path / "out"), "--backend", "hf", "--adapter", str(folder)]
        assert run_cli.main(argv) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert str(folder.name) in out and ("row_threshold" in out if n == 0 else "sentence" in out)
        assert not (tmp_path / "out").exists()
