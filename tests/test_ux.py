"""What a newcomer reads: a verdict per scan with its threshold, reasons in words and units, one summary for a
folder
run, the `scanagent` console script, quiet third-party libraries, one list syntax, --help with exit codes, and
one
permission mode for every output file.

Tiny fits (tests/tiny.py), small scans; the CLIs are called in-process except where a fresh interpreter is the
point.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import agent.run as run_cli
from agent import cli
from agent.backends import get_backend
from agent.explain import evidence_phrases
from agent.pipeline import inspect_scan
from detector.calibration import OBJECT_THRESHOLD, object_threshold, verdict_of
from detector.fitted import FittedClass
from scans.bench import build_benchmark, class_list
from scans.io import write_pcd
from tests.tiny import TINY_FIT, part_scans
from verbalize import describe_scan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bank(fitted: FittedClass, tmp_path_factory) -> Path:
    return fitted.save(tmp_path_factory.mktemp("fit") / "bracket")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    for i, points in enumerate(part_scans(2, 2000, seed=50)):
        write_pcd(folder / f"part{i}.pcd", points)
    return folder


# ------------------------------------------------------------------------------------------------ the verdict
def test_threshold_rule_is_max_plus_spread_of_normal_scores():
    scores = np.array([1.0, 2.0, 4.0])
    found = object_threshold(scores)
    assert found[OBJECT_THRESHOLD] == pytest.approx(4.0 + scores.std())
    assert object_threshold(np.array([])) == {}
    assert (
        verdict_of(5.0, 4.5) == "defective"
        and verdict_of(4.5, 4.5) == "normal"
        and verdict_of(9.0, None) is None
    )


def test_the_leave_two_out_lean_is_measured_but_does_not_lower_the_threshold():
    one_out = np.array([1.0, 2.0, 4.0])
    plain = object_threshold(one_out)[OBJECT_THRESHOLD]
    leaning = object_threshold(one_out, one_out * 1.25)  # one template fewer raised normal scores by 25%
    assert leaning["object_loo_lean"] == pytest.approx(1.25)
    assert leaning[OBJECT_THRESHOLD] == pytest.approx(plain)
    assert leaning["object_threshold_lean_corrected"] == pytest.approx(plain / 1.25)
    assert object_threshold(one_out, one_out * 0.8)["object_loo_lean"] == 1.0  # never below 1


def test_a_fit_saves_an_object_threshold_above_its_normal_object_scores(fitted, tmp_path):
    t = fitted.thresholds
    assert t["object_loo_lean"] >= 1.0
    assert t[OBJECT_THRESHOLD] >= t["object_normal_max"] >= t["object_threshold_lean_corrected"] / 2
    assert t["object_normal_max"] >= t["object_normal_median"] > 0
    assert t["object_normal_n"] == 3 * TINY_FIT.bank_views  # one per bank view of every template
    assert FittedClass.load(fitted.save(tmp_path / "fit")).thresholds[OBJECT_THRESHOLD] == t[OBJECT_THRESHOLD]


def test_report_says_defective_or_normal_against_the_class_threshold(fitted, scan, analysis):
    policy = get_backend("policy")
    report = inspect_scan(scan, fitted, policy, analysis=analysis).report()
    assert report["threshold"] == pytest.approx(fitted.thresholds[OBJECT_THRESHOLD])
    expected = "defective" if report["object_score"] > report["threshold"] else "normal"
    assert report["verdict"] == expected
    assert report["summary"].startswith(f"{expected}: object score")
    assert "object_score" in report and "regions" in report  # the old keys stay
    # the same scan against a lower and a higher threshold flips the verdict: it follows the threshold
    for threshold, verdict in (
        (0.5 * report["object_score"], "defective"),
        (2.0 * report["object_score"], "normal"),
    ):
        strict = FittedClass(
            fitted.config,
            fitted.scale,
            fitted.bank,
            fitted.mean_feature,
            {**fitted.thresholds, OBJECT_THRESHOLD: threshold},
            fitted.backbone,
            score_norms=fitted.score_norms,
            cues=fitted.cues,
        )
        assert inspect_scan(scan, strict, policy, analysis=analysis).report()["verdict"] == verdict


def test_zero_shot_and_old_fits_give_no_verdict(fitted, scan, analysis):
    zero = inspect_scan(scan, None, get_backend("policy")).report()
    assert zero["verdict"] is None and zero["threshold"] is None
    assert zero["summary"].startswith("no verdict (uncalibrated)")
    old = FittedClass(
        fitted.config,
        fitted.scale,
        fitted.bank,
        fitted.mean_feature,
        {k: v for k, v in fitted.thresholds.items() if not k.startswith("object_")},
        fitted.backbone,
        score_norms=fitted.score_norms,
        cues=fitted.cues,
    )
    report = inspect_scan(scan, old, get_backend("policy"), analysis=analysis).report()
    assert report["verdict"] is None and "refit" in report["summary"]


# ------------------------------------------------------------------------------------------ reasons in words
def _plate_with_bump(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A flat plate in scan units (0..40) and a per-point statistic that is high on one corner."""
    points = np.column_stack([rng.uniform(0, 40, 3000), rng.uniform(0, 40, 3000), rng.normal(0, 0.01, 3000)])
    corner = (points[:, 0] < 6) & (points[:, 1] < 6)
    values = np.where(corner, 0.6, 0.02) + rng.uniform(0, 0.01, 3000)
    return points, values


def test_template_distance_is_said_in_scan_units_and_point_spacings(rng):
    points, distance = _plate_with_bump(rng)
    _, table = describe_scan(points, {"template_distance": distance}, n_patches=40, seed=0)
    worst = int(np.argmax(table.columns["template_distance_max"]))
    phrases = evidence_phrases(table, [worst])
    top = table.columns["template_distance_max"][worst]
    assert any(
        f"surface {top:.3g} scan units from the templates' surface" in p and "x the point spacing" in p
        for p in phrases
    ), phrases


def test_reconstruction_error_is_said_as_a_multiple_of_the_typical(rng):
    points, error = _plate_with_bump(rng)
    _, table = describe_scan(points, {"recon_error": error}, n_patches=40, seed=0)
    worst = int(np.argmax(table.columns["recon_error_max"]))
    ratio = table.columns["recon_error_max"][worst] / np.median(table.columns["recon_error_mean"])
    assert (
        f"shape unfamiliar to the model: {ratio:.1f}x the scan's typical reconstruction error"
        in evidence_phrases(table, [worst])
    )


def test_every_region_of_a_report_has_an_explanation(fitted, scan, analysis):
    report = inspect_scan(scan, fitted, get_backend("policy"), analysis=analysis).report()
    assert report["regions"]
    for region in report["regions"]:
        assert region["explanation"].startswith((region["verdict"], "not verified"))
        if region["verdict"] != "skipped":
            assert "x the class's normal patch limit" in region["explanation"]


# --------------------------------------------------------------------------------------------- folder runs
def test_a_folder_run_ends_with_one_table_and_writes_summary_files(bank, scans, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli.main([str(scans), "--bank", str(bank), "--out", str(out), "--no-render"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("run summary") == 1
    assert "agent's reason" not in printed  # no per-scan regions table without -v
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [Path(r["scan"]).name for r in rows] == ["part0.pcd", "part1.pcd"]
    assert {"scan", "verdict", "object_score", "regions", "seconds"} <= rows[0].keys()
    document = json.loads((out / "summary.json").read_text())
    for row, scan_row in zip(rows, document["scans"]):
        report = json.loads((Path(scan_row["outputs"]) / "report.json").read_text())
        assert row["verdict"] == scan_row["verdict"] == report["verdict"]
        assert float(row["object_score"]) == pytest.approx(report["object_score"])
    assert sum(document["counts"].values()) == 2


def test_one_scan_writes_no_run_summary(bank, scans, tmp_path):
    assert (
        run_cli.main([str(scans / "part0.pcd"), "--bank", str(bank), "--out", str(tmp_path), "--no-render"])
        == 0
    )
    assert not (tmp_path / "summary.csv").exists()


# ------------------------------------------------------------------------------------------ files and CLIs
def test_output_files_share_one_mode_that_follows_the_umask(bank, scans, tmp_path):
    before = os.umask(0o022)
    try:
        assert run_cli.main([str(scans), "--bank", str(bank), "--out", str(tmp_path)]) == 0
    finally:
        os.umask(before)
    folder = tmp_path / "part0"
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes) >= {"report.json", "scores.npy", "scores.ply", "regions.png", "transcript.jsonl"}
    assert set(modes.values()) == {0o644}, modes
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "summary.csv").stat().st_mode & 0o777 == 0o644


def test_console_script_is_declared_and_dispatches(capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["scanagent"] == "agent.cli:main"
    assert cli.main(["--help"]) == 0 and "exit codes" in capsys.readouterr().out
    assert cli.main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    assert "exit codes: 0 ok, 2 bad input" in text and "3 backend unavailable" in text
    assert "most model replies per scan" in text  # --max-turns has a help text
    assert cli.main(["nonsense"]) == 2
    for name in ("fit", "eval", "bench", "datasets"):
        assert cli.main([name, "--help"]) == 0
        assert "exit codes" in capsys.readouterr().out


def test_bench_takes_comma_lists_and_the_old_space_form():
    assert class_list(["flange,gear"]) == class_list(["flange", "gear"]) == ["flange", "gear"]
    assert class_list(["flange, gear", "shaft"]) == ["flange", "gear", "shaft"]


def test_bench_says_why_a_real_scan_class_is_refused(tmp_path, capsys):
    missing = tmp_path / "no-shared" / "data" / "scans"
    with pytest.raises(ValueError, match="SCANAGENT_SHARED") as error:
        build_benchmark(tmp_path / "bench", classes=["bunny"], scans_dir=missing)
    assert str(missing) in str(error.value) and "real-scan class" in str(error.value)
    assert (
        cli.main(
            ["bench", "--out", str(tmp_path / "b"), "--classes", "flange,bunny", "--scans", str(missing)]
        )
        == 2
    )
    assert "'bunny' is a real-scan class" in capsys.readouterr().err


QUIET_PROBE = """
import sys, warnings
from agent.quiet import quiet_third_party
quiet_third_party(verbose=sys.argv[1] == "1")
from tqdm.auto import tqdm
for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors"):
    pass
warnings.warn("old api", FutureWarning)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_bars_and_warnings_only_with_verbose(verbose):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "HF_HUB_DISABLE", "TRANSFORMERS_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", QUIET_PROBE, "1" if verbose else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert ("GGUF" in done.stderr and "FutureWarning" in done.stderr) == verbose, done.stderr
