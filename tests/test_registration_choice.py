"""Registration decided by the fit (detector.registration_choice, agent.fit --register / --no-register)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from agent.fit import EXIT_OK, main
from detector.grouping import estimate_scale
from detector.registration_choice import choose_registration
from scans.io import write_pcd
from scans.parts import part_mesh, sample_surface, scan_like


def flange_scans(count: int, max_rotation_deg: float) -> list[np.ndarray]:
    mesh = part_mesh("flange")
    out = []
    for i in range(count):
        clean, normals = sample_surface(mesh, 2500, seed=i)
        moved = scan_like(clean, normals, seed=10 + i, max_rotation_deg=max_rotation_deg, max_shift=0.0)[0]
        out.append(moved.astype(np.float32))
    return out


@pytest.mark.parametrize(("rotation", "register"), [(0.0, False), (8.0, True)])
def test_the_fit_registers_only_scans_that_are_not_aligned(rotation, register):
    scans = flange_scans(3, rotation)
    choice = choose_registration(scans, ["a", "b", "c"], estimate_scale(scans))
    assert choice.register is register
    assert ("not pre-aligned" in choice.reason) is register
    assert choice.residual_aligned < choice.residual_unmoved or not register
    assert len(choice.aligned) == (3 if register else 0)


def _fit(argv: list) -> tuple[int, str]:
    buffer = io.StringIO()
    code = main([str(a) for a in argv], console=Console(file=buffer, width=400, force_terminal=False))
    return code, buffer.getvalue()


def test_agent_fit_says_what_it_decided_and_the_flags_force_it(tmp_path):
    folder = tmp_path / "train"
    for i, points in enumerate(flange_scans(3, 8.0)):
        write_pcd(folder / f"flange_{i}.pcd", points)
    code, text = _fit(["--train", folder, "--out", tmp_path / "auto", "--feature", "fpfh"])
    assert code == EXIT_OK, text
    assert "register (decided by the fit)" in text and "not pre-aligned" in text
    meta = json.loads((tmp_path / "auto" / "fitted.json").read_text())
    assert meta["config"]["register"] is True
    assert meta["info"]["registration_decision"]["decided_by"] == "fit"
    code, text = _fit(["--train", folder, "--out", tmp_path / "forced", "--feature", "fpfh", "--no-register"])
    assert code == EXIT_OK, text
    assert "no registration (forced by the flag)" in text
    assert json.loads((tmp_path / "forced" / "fitted.json").read_text())["config"]["register"] is False
