"""What a policy run imports: a cold start pays for every heavy package it loads.

A registered fit whose scans arrive in about the templates' pose is aligned by ICP alone (the early stop), so
the run needs neither open3d (only the FPFH + RANSAC fallback does) nor sklearn (only a fit's coreset does),
a policy run never the LLM stacks (transformers, langchain, openai), writing its pictures (regions.png,
viewer.html) and scores.ply never matplotlib, and Point-MAE runs as the fit's exported graph, never torch.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from detector.fitting import fit_class
from tests.test_registration import turned
from tests.tiny import TINY_FIT, part_scans

ROOT = Path(__file__).resolve().parents[1]
NOT_IMPORTED = (
    "transformers", "langchain", "langchain_core", "openai", "open3d", "sklearn", "matplotlib", "torch",
)


def test_policy_run_of_a_registered_fit_imports_no_llm_stack_torch_open3d_sklearn_matplotlib(tmp_path):
    scans = part_scans(4, 3000, seed=3)
    fitted = fit_class(scans[:3], dataclasses.replace(TINY_FIT, register=True))
    bank = fitted.save(tmp_path / "fit")
    scan = tmp_path / "scan.npy"
    np.save(scan, turned(scans[3], 2.0, shift=(0.0, 0.0, 0.0)))
    argv = ["agent.run", str(scan), "--bank", str(bank), "--out", str(tmp_path / "out")]
    code = (
        "import runpy, sys, json\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    runpy.run_module('agent.run', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(NOT_IMPORTED)!r}))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "scan" / "report.json").read_text())
    assert not report["registration"]["doubtful"]
    assert (tmp_path / "out" / "scan" / "regions.png").is_file()
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
