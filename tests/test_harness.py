"""The eval harness: the `--quick` run end to end, resumption, failing backends, and Ray parity.

One real `python -m evals.run --quick` run (built once per module) is both the CI smoke test and the reference
the
other tests compare against; they reuse its benchmark and its fits (copied, so the fit cache is exercised) and
run on
a small subset so each adds only seconds of work.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.backends import REGISTRY, BackendUnavailable
from agent.backends.policy import PolicyBackend
from evals import harness, methods
from evals.harness import HarnessConfig, ResultStore, parse_backend, quick_detector_config, run_harness
from evals.run import main
from scans.datasets import Sample

QUICK_METHODS = ("pointmae-bank", "recon", "random")
QUICK_BACKENDS = ("policy",)
TIMING_KEYS = {"seconds", "own_s", "analyse_s"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harness") / "quick"
    code = main(
        [
            "--quick",
            "--methods",
            ",".join(QUICK_METHODS),
            "--backends",
            ",".join(QUICK_BACKENDS),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def _subset_config(quick: Path, out: Path, **overrides) -> HarnessConfig:
    """A run on one class, 3 scans, of the quick benchmark, reusing the quick run's fits."""
    if (quick / "fits").is_dir() and not (out / "fits").exists():
        shutil.copytree(quick / "fits", out / "fits")
    settings: dict = {
        "data": f"anomaly-shapenet:{quick / 'quick-bench'}",
        "out": out,
        "classes": ("flange",),
        "limit": 3,
        "methods": ("pointmae-bank", "random"),
        "backends": (parse_backend("policy"), parse_backend("random-regions")),
        "detector": quick_detector_config(),
        "transcripts": False,
    }
    settings.update(overrides)
    return HarnessConfig(**settings)


def _comparable(rows: dict) -> dict:
    return {key: {k: v for k, v in row.items() if k not in TIMING_KEYS} for key, row in rows.items()}


# ------------------------------------------------------------------------------------------------------ quick
# run
@pytest.mark.slow
def test_quick_run_writes_a_sane_summary(quick_run: Path) -> None:
    meta = json.loads((quick_run / "run.json").read_text())
    n_scans = sum(t["selected"] for t in meta["tests"].values())
    names = [*QUICK_METHODS, *QUICK_BACKENDS]
    assert meta["names"] == names and n_scans == 10  # 2 classes x (2 normal + 3 defective)

    rows = ResultStore(quick_run).rows()
    assert len(rows) == len(names) * n_scans
    assert all(r["status"] == "ok" for r in rows)
    for row in rows:
        scores = np.load(quick_run / row["scores"], allow_pickle=False)
        assert scores.shape == (row["n_points"],) and np.isfinite(scores).all()
        if row["name"] == "policy":
            assert 0.0 < row["verified_fraction"] <= 0.2
            assert row["tool_calls"] >= 2 and not row["fallback_used"]

    summary = json.loads((quick_run / "summary.json").read_text())
    assert list(summary) == names
    for name, per_class in summary.items():
        assert set(per_class) == {*meta["classes"], "mean"}
        for cls in meta["classes"]:
            entry = per_class[cls]
            assert entry["n_scans"] == 5 and entry["n_failed"] == 0
            for metric in ("o_auroc", "p_auroc", "au_pro"):
                assert 0.0 <= entry[metric] <= 1.0, (name, cls, metric)
            assert set(entry["per_defect"]) == {"bulge", "concavity", "hole"}
        assert per_class["mean"]["n_scans"] == 10
    policy = summary["policy"]["mean"]
    assert 0.0 <= policy["region_recall"] <= 1.0 and 0.0 < policy["verified_fraction"] <= 0.2
    assert summary["pointmae-bank"]["mean"]["verified_fraction"] == 1.0
    for name in (
        "pointmae-bank",
        "policy",
    ):  # calibrated verdicts: shares of normal / defective scans called defective
        mean = summary[name]["mean"]
        assert 0.0 <= mean["false_alarm_rate"] <= 1.0 and 0.0 <= mean["detection_rate"] <= 1.0, name
    assert all(
        r["verdict"] in ("defective", "normal") for r in rows if r["name"] in ("pointmae-bank", "policy")
    )
    assert summary["pointmae-bank"]["flange"]["fit_s"] > 0

    table = (quick_run / "table.md").read_text()
    assert all(f"| {name} |" in table for name in names) and "no --limit" in table
    assert "Agent budget per scan: at most 8 turns" in table  # the ceiling of the cost columns
    csv_lines = (quick_run / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(names) * 3  # header + (2 classes + mean) per name
    html = (quick_run / "report.html").read_text()
    for png in ("accuracy_vs_verified", "accuracy_vs_tokens", "roc", "per_class"):
        assert (quick_run / "report" / f"{png}.png").stat().st_size > 10_000
        assert f"report/{png}.png" in html
    assert "examples/" in html and "Agent budget per scan" in html


# ------------------------------------------------------------------------------------------------------
# resumption
@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(quick_run: Path, tmp_path: Path) -> None:
    reference = run_harness(_subset_config(quick_run, tmp_path / "whole"), write_report=False)
    assert reference.ran == 4 * 3 and reference.failed == 0

    config = _subset_config(quick_run, tmp_path / "resumed")
    stored: list[dict] = []

    def interrupt_after_first_scan(row: dict) -> None:
        stored.append(row)
        if len(stored) == len(config.names):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_harness(config, on_row=interrupt_after_first_scan)
    assert len(ResultStore(config.out).rows()) == len(config.names)
    with (config.out / "results.jsonl").open("a") as handle:  # a kill in the middle of writing a row
        handle.write('{"name": "policy", "cla')

    rerun: list[dict] = []
    outcome = run_harness(config, on_row=rerun.append)
    assert outcome.skipped == len(config.names) and outcome.ran == 4 * 2
    assert {r["scan"] for r in rerun}.isdisjoint({stored[0]["scan"]})
    finished, expected = ResultStore(config.out).latest(), ResultStore(tmp_path / "whole").latest()
    assert _comparable(finished) == _comparable(expected)
    for row in finished.values():
        np.testing.assert_array_equal(
            np.load(config.out / row["scores"]), np.load(tmp_path / "whole" / row["scores"])
        )
    assert (config.out / "summary.json").is_file()


# ------------------------------------------------------------------------------------------------------
# failures
class _FlakyBackend:
    """Delegates to the policy, but raises on every other scan (a conversation starts with two messages)."""

    name = "flaky"
    conversations = 0  # counted over instances, so a rerun's new instance continues the pattern

    def __init__(self) -> None:
        self.policy = PolicyBackend()

    def chat(self, messages: list[dict], tools: list[dict]):
        if len(messages) == 2:
            type(self).conversations += 1
        if type(self).conversations % 2 == 0:
            raise RuntimeError("flaky server said 502")
        return self.policy.chat(messages, tools)


def _unavailable(**kwargs):
    raise BackendUnavailable("no server at http://127.0.0.1:9")


@pytest.mark.slow
def test_failing_backends_are_recorded_not_fatal(quick_run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, "flaky", lambda **kwargs: _FlakyBackend())
    monkeypatch.setitem(REGISTRY, "down", _unavailable)
    monkeypatch.setattr(_FlakyBackend, "conversations", 0)
    config = _subset_config(
        quick_run,
        tmp_path,
        methods=("random",),
        backends=(parse_backend("flaky"), parse_backend("down")),
        fallback=False,
    )
    outcome = run_harness(config)
    rows = ResultStore(tmp_path).latest()
    flaky = [
        rows[("flaky", "flange", scan)]
        for scan in json.loads((tmp_path / "run.json").read_text())["tests"]["flange"]["scans"]
    ]
    assert [r["status"] for r in flaky] == ["ok", "failed", "ok"]
    assert "502" in flaky[1]["reason"] and "scores" not in flaky[1]
    assert all(rows[("down", "flange", r["scan"])]["status"] == "failed" for r in flaky)
    assert "no server" in rows[("down", "flange", flaky[0]["scan"])]["reason"]
    assert outcome.failed == 1 + 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["flaky"]["flange"]["n_failed"] == 1 and summary["flaky"]["flange"]["n_scans"] == 2
    assert summary["down"]["flange"]["n_scans"] == 0 and summary["down"]["mean"]["n_failed"] == 3
    assert summary["random"]["flange"]["n_scans"] == 3  # the methods are untouched by failing backends

    # With the fallback (the default), a rerun retries the failed scan (the 4th conversation: it fails again)
    # and the
    # policy finishes it, on record.
    run_harness(_subset_config(quick_run, tmp_path, methods=("random",), backends=(parse_backend("flaky"),)))
    retried = ResultStore(tmp_path).latest()[("flaky", "flange", flaky[1]["scan"])]
    assert retried["status"] == "ok" and retried["fallback_used"] and "502" in retried["fallback_reason"]


@pytest.mark.slow
def test_a_method_or_backbone_failing_on_a_scan_is_recorded_not_fatal(
    quick_run: Path, tmp_path: Path, monkeypatch
) -> None:
    from detector.fitted import FittedClass

    config = _subset_config(quick_run, tmp_path, methods=("pointmae-bank", "random"), backends=())
    real_random, real_analyse = methods.REGISTRY["random"], FittedClass.analyse
    random_scans: list[str] = []
    analysed: list[int] = []

    def random_fails_on_first_scan(scan):
        random_scans.append(scan.scan)
        if len(random_scans) == 1:
            raise RuntimeError("disk full")
        return real_random.run(scan)

    def analyse_fails_on_second_scan(self, points):
        analysed.append(len(points))
        if len(analysed) == 2:
            raise MemoryError("out of memory")
        return real_analyse(self, points)

    monkeypatch.setitem(methods.REGISTRY, "random", replace(real_random, run=random_fails_on_first_scan))
    monkeypatch.setattr(FittedClass, "analyse", analyse_fails_on_second_scan)
    outcome = run_harness(config, write_report=False)
    rows = ResultStore(tmp_path).latest()
    assert len(rows) == 6 and outcome.failed == 2
    failed = {key: row["reason"] for key, row in rows.items() if row["status"] == "failed"}
    assert "disk full" in failed.pop(("random", "flange", random_scans[0]))
    (name, _, _), reason = failed.popitem()
    assert name == "pointmae-bank" and "backbone pass failed" in reason and "out of memory" in reason
    assert len(random_scans) == 3  # the random method still ran on the scan whose backbone pass failed


# ------------------------------------------------------------------------------------------------------ ray
@pytest.mark.slow
def test_ray_executor_matches_local(quick_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    local = run_harness(_subset_config(quick_run, tmp_path / "local", limit=2), write_report=False)
    remote = run_harness(
        _subset_config(quick_run, tmp_path / "ray", limit=2, executor="ray"), write_report=False
    )
    assert local.ran == remote.ran == 4 * 2 and remote.failed == 0
    a, b = ResultStore(tmp_path / "local").latest(), ResultStore(tmp_path / "ray").latest()
    assert a.keys() == b.keys()
    for key in a:
        ra, rb = a[key], b[key]
        assert math.isclose(ra["object_score"], rb["object_score"], rel_tol=1e-5, abs_tol=1e-7), key
        assert ra.get("regions") == rb.get("regions") and ra["verified_fraction"] == rb["verified_fraction"]
        np.testing.assert_allclose(
            np.load(tmp_path / "local" / ra["scores"]),
            np.load(tmp_path / "ray" / rb["scores"]),
            rtol=1e-5,
            atol=1e-7,
        )


# ------------------------------------------------------------------------------------------------------ small
# parts
def _sample(name: str, label: int) -> Sample:
    return Sample(
        path=Path(f"/data/{name}.pcd"),
        cls="c",
        split="test",
        label=label,
        defect_type="good" if label == 0 else "hole",
    )


def test_limit_keeps_defective_and_normal_scans() -> None:
    samples = [_sample(f"d{i}", 1) for i in range(5)] + [_sample(f"n{i}", 0) for i in range(2)]
    chosen = harness.select_tests(samples, 3)
    assert [s.path.stem for s in chosen] == ["d0", "d1", "n0"]
    assert harness.select_tests(samples, None) == samples
    assert [s.path.stem for s in harness.select_tests(samples, 6)] == ["d0", "d1", "d2", "d3", "n0", "n1"]


def test_scan_ids_are_unique_when_stems_repeat() -> None:
    a = Sample(path=Path("/m/test/crack/xyz/000.tiff"), cls="c", split="test", label=1, defect_type="crack")
    b = Sample(path=Path("/m/test/good/xyz/000.tiff"), cls="c", split="test", label=0, defect_type="good")
    assert harness.scan_ids([a, b]) == ["crack_000", "good_000"]


def test_backend_specs_and_bad_input() -> None:
    spec = parse_backend("openai:SmolLM2", base_url="http://127.0.0.1:8000/v1")
    assert (spec.label, spec.name, spec.kwargs) == (
        "openai:SmolLM2",
        "openai",
        {"model": "SmolLM2", "base_url": "http://127.0.0.1:8000/v1"},
    )
    assert parse_backend("langchain:langchain_openai:ChatOpenAI").kwargs == {
        "chat_model": "langchain_openai:ChatOpenAI"
    }
    assert harness.safe_name("openai:org/model") == "openai_org_model"
    with pytest.raises(harness.HarnessError, match="unknown backend"):
        parse_backend("gpt5")
    with pytest.raises(harness.HarnessError, match="unknown methods"):
        HarnessConfig(data="x:y", out=Path("o"), methods=("patchcore",))
    assert main(["--data", "anomaly-shapenet:/nonexistent/root", "--out", "/tmp/never-written"]) == 2
    assert not Path("/tmp/never-written").exists()


@pytest.mark.slow
def test_a_guided_row_inspects_its_scans_with_the_guidance(quick_run: Path, tmp_path: Path) -> None:
    everything = "Ignore everything with x above -5 (normalised coordinates)."  # every patch is centred there
    guided = parse_backend(f"policy:guidance={everything}")
    run_harness(_subset_config(quick_run, tmp_path, methods=(), backends=(parse_backend("policy"), guided)))
    rows = ResultStore(tmp_path).latest()
    plain = [r for (label, _, _), r in rows.items() if label == "policy"]
    followed = [r for (label, _, _), r in rows.items() if label == guided.label]
    assert len(plain) == len(followed) == 3
    assert all(r["regions"] for r in plain) and not any(r["regions"] for r in followed)


def test_a_defect_placeholder_names_each_scans_own_kind_and_normal_scans_run_unguided() -> None:
    spec = parse_backend("policy:guidance=Look for {defect} only.;label=policy+own-kind")
    assert spec.guidance_for("bulge") == "Look for bulge only."
    assert spec.guidance_for("good") is None and spec.guidance_for("unknown") is None
    plain = parse_backend("policy:guidance=sharp ridges are normal")
    assert plain.guidance_for("good") == plain.guidance_for("hole") == "sharp ridges are normal"


def test_random_regions_is_seeded_and_stays_within_the_policy_budget() -> None:
    from agent.backends import get_backend

    tools = [
        {"type": "function", "function": {"name": n, "parameters": {}}}
        for n in ("list_patches", "report_suspects")
    ]
    start = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]

    def regions(seed: int, listing: dict) -> list[int]:
        backend = get_backend("random-regions", seed=seed)
        first = backend.chat(start, tools)
        assert first.tool_calls[0].name == "list_patches"
        messages = start + [
            first.to_message(),
            {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": json.dumps(listing)},
        ]
        report = backend.chat(messages, tools).tool_calls[0]
        assert report.name == "report_suspects"
        return [pid for r in json.loads(report.arguments)["regions"] for pid in r["patch_ids"]]

    listing = {"total_patches": 40, "patches": [{"id": i, "n_points": 100} for i in range(40)]}
    first = regions(0, listing)
    assert first == regions(0, listing)  # same seed, same scan: same regions
    assert len(first) == int(PolicyBackend().target_share * 40) and len(set(first)) == len(first)
    assert all(0 <= pid < 40 for pid in first)
    other_scan = {**listing, "patches": listing["patches"][::-1]}
    assert {tuple(regions(s, listing)) for s in range(5)} | {tuple(regions(0, other_scan))} != {tuple(first)}


def test_a_pretrained_init_gets_its_own_fit_and_a_wrong_one_is_refused(
    quick_run: Path, tmp_path: Path
) -> None:
    """--init: fits that start from a pretrained backbone are cached apart from fits from scratch; a backbone
    of another
    architecture is refused with the folder named."""
    from detector.fitted import FittedClass
    from detector.pointmae import PointMAE, PointMAEConfig, save_backbone
    from scans.datasets import open_dataset

    dataset = open_dataset(f"anomaly-shapenet:{quick_run / 'quick-bench'}")
    from dataclasses import replace

    from detector.pointmae import backbone_hash

    config = replace(
        quick_detector_config(), train_steps=0
    )  # no training: the fit keeps the pretrained weights
    model = PointMAE(config.backbone)
    pretrained = save_backbone(model, tmp_path / "pretrained")
    scratch = harness.ensure_fit(tmp_path / "out", dataset, "flange", "pointmae", config)
    started = harness.ensure_fit(
        tmp_path / "out", dataset, "flange", "pointmae", config, init_backbone=pretrained
    )
    assert scratch["dir"] != started["dir"] and not started["reused"]
    fitted = FittedClass.load(started["dir"])
    assert fitted.backbone_id() == backbone_hash(model) != FittedClass.load(scratch["dir"]).backbone_id()
    assert fitted.info["init_backbone"]["hash"] == backbone_hash(model)
    other = save_backbone(PointMAE(PointMAEConfig.small()), tmp_path / "other")
    with pytest.raises(harness.HarnessError, match="other.*does not load"):
        harness.ensure_fit(tmp_path / "out", dataset, "flange", "pointmae", config, init_backbone=other)


def test_oracle_regions_keeps_the_full_banks_top_points_and_the_prior_elsewhere(
    quick_run: Path, tmp_path: Path
):
    """The ceiling row: per scan, the budget's worth of points carry their full-bank scores, all others sit
    below the
    verifier's prior floor, and the object score is the full bank's."""
    config = _subset_config(
        quick_run, tmp_path / "oracle", methods=("pointmae-bank", "oracle-regions"), backends=()
    )
    run_harness(config, write_report=False)
    rows = ResultStore(config.out).latest()
    by_scan: dict[str, dict] = {}
    for row in rows.values():
        by_scan.setdefault(row["scan"], {})[row["name"]] = row
    assert len(by_scan) == 3
    for pair in by_scan.values():
        full_row, oracle_row = pair["pointmae-bank"], pair["oracle-regions"]
        assert (
            oracle_row["object_score"] == full_row["object_score"] and oracle_row["verified_fraction"] == 1.0
        )
        full, oracle = np.load(config.out / full_row["scores"]), np.load(config.out / oracle_row["scores"])
        kept = oracle == full
        assert kept.sum() >= int(0.2 * len(full)) and kept.mean() < 0.25
        assert oracle[~kept].max() < full[kept].min()  # the prior stays below every kept bank score


def test_report_groups_failure_and_fallback_reasons():
    from evals.report import reason_lines

    summary = {
        "hf": {
            "mean": {
                "fallback_reasons": {
                    "context window of 8192 tokens: needs 8658": 2,
                    "context window of 8192 tokens: needs 9001": 1,
                    "malformed output after 1 repair(s): n_samples": 4,
                }
            }
        },
        "policy": {"mean": {}},
    }
    lines = reason_lines(summary)
    assert lines[0] == "- hf fell back x4: malformed output after N repair(s): n_samples"
    assert lines[1] == "- hf fell back x3: context window of N tokens: needs N" and len(lines) == 2
