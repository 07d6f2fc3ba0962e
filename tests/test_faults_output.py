"""Output faults of `agent.run` and `agent.fit` (issue 10): a user's folder where an output would go is refused, not
deleted; --out places that cannot be written are refused with exit 2 before any work; a broken or unsafe --templates
folder exits 2 and leaves nothing behind; two writers of the same output folder do not trip over each other.

Every test runs the CLIs in-process (their `main` functions). The tests run as root, which may write to read-only
folders, so "cannot be written" is simulated two ways that hold for root too: a path under a regular file, and a path
under /proc (where no folder can be made).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console

import agent.fit as fit_cli
import agent.pipeline
import agent.run as run_cli
import detector.fitted
from agent.report import staged_dir
from detector.fitted import FittedClass, fit_class
from scans.io import write_pcd
from tests.tiny import TINY_FIT, part_scans

OWN_FILES = "report.json"  # one file every scan output holds


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    return fit_class(part_scans(3, 2500, seed=0), TINY_FIT).save(tmp_path_factory.mktemp("fit") / "bracket")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """A folder with two good scans of the class, part0.pcd and part1.pcd."""
    folder = tmp_path_factory.mktemp("scans")
    for i, points in enumerate(part_scans(2, 2000, seed=50)):
        write_pcd(folder / f"part{i}.pcd", points)
    return folder


def run(*argv: object) -> int:
    return run_cli.main([str(a) for a in argv] + ["--no-render"])


def fit(*argv: object) -> tuple[int, str]:
    buffer = io.StringIO()
    code = fit_cli.main([str(a) for a in argv], console=Console(file=buffer, width=400, force_terminal=False))
    return code, buffer.getvalue()


def unwritable_places(tmp_path: Path) -> list[Path]:
    """Folders no process can create, root included: below a regular file, and below /proc."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return [blocker / "out", Path("/proc") / f"scanagent-test-{os.getpid()}" / "out"]


def leftovers(folder: Path) -> list[str]:
    """Temporary folders left beside outputs (staging or moved-aside old outputs)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def no_scoring(monkeypatch):
    """Fail the test if a scan is inspected: the checks under test must come before any scoring work."""
    def tripwire(*args, **kwargs):
        raise AssertionError("a scan was inspected although its output could not be written")

    monkeypatch.setattr(agent.pipeline, "inspect_scan", tripwire)


# ------------------------------------------------------------------------------------- item 1: the user's data
@pytest.mark.parametrize("kind", ["folder", "symlink to a folder"])
def test_a_users_folder_where_an_output_goes_is_refused_and_kept(bank, scans, tmp_path, capsys, kind):
    out = tmp_path / "out"
    assert run(scans / "part0.pcd", "--bank", bank, "--out", out) == 0
    assert run(scans / "part0.pcd", "--bank", bank, "--out", out) == 0  # a rerun replaces its own earlier output
    assert (out / "part0" / OWN_FILES).is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    if kind == "folder":
        mine = mine.rename(out / "part1")
    else:
        (out / "part1").symlink_to(mine, target_is_directory=True)
    capsys.readouterr()
    assert run(scans, "--bank", bank, "--out", out) == 2  # part0 is replaced, part1 is refused
    printed = " ".join(capsys.readouterr().out.split())
    assert f"{out / 'part1'}: exists and is" in printed and "refusing to replace it" in printed
    assert (mine / "notes.txt").read_text() == "keep me" and (out / "part1" / "notes.txt").is_file()
    assert (out / "part0" / OWN_FILES).is_file() and leftovers(out) == []


# ------------------------------------------------------------------------------------ item 2: output paths
def test_out_that_is_an_existing_file_exits_2_and_keeps_the_file(bank, scans, tmp_path, capsys, no_scoring):
    out = tmp_path / "results"
    out.write_text("my results")
    assert run(scans / "part0.pcd", "--bank", bank, "--out", out) == 2
    assert f"{out}: the --out folder exists and is a file" in " ".join(capsys.readouterr().out.split())
    assert out.read_text() == "my results"


def test_out_where_no_folder_can_be_made_exits_2_before_any_work(bank, scans, tmp_path, capsys, no_scoring):
    for out in unwritable_places(tmp_path):
        assert run(scans / "part0.pcd", "--bank", bank, "--out", out) == 2, out
        assert f"{out}: the --out folder cannot be" in " ".join(capsys.readouterr().out.split())


def test_a_file_named_like_a_scans_output_is_reported_and_the_batch_goes_on(bank, scans, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part0").write_text("a file of mine")
    assert run(scans, "--bank", bank, "--out", out) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert f"{out / 'part0'}: exists and is a file" in printed
    assert (out / "part0").read_text() == "a file of mine"
    assert (out / "part1" / OWN_FILES).is_file() and leftovers(out) == []


def test_fit_out_where_no_folder_can_be_made_fails_before_fitting(scans, tmp_path, monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("fitted although --out cannot be written")

    monkeypatch.setattr(detector.fitted, "fit_class", tripwire)
    for out in unwritable_places(tmp_path):
        code, text = fit("--train", scans, "--out", out, "--feature", "fpfh")
        assert code == fit_cli.EXIT_BAD_INPUT, text
        assert f"--out {out}: cannot be written: {out.parent}: the folder to hold the fit" in text


# --------------------------------------------------------------------------------------- item 6: --templates
def test_a_missing_templates_folder_exits_2_and_writes_nothing(bank, scans, tmp_path, capsys, no_scoring):
    out, missing = tmp_path / "out", tmp_path / "no-such-templates"
    assert run(scans / "part0.pcd", "--bank", bank, "--out", out, "--templates", missing) == 2
    assert f"{missing}: template override directory does not exist" in capsys.readouterr().out
    assert not out.exists()


def test_a_template_syntax_error_exits_2_naming_file_and_line(bank, scans, tmp_path, capsys, no_scoring):
    templates, out = tmp_path / "templates", tmp_path / "out"
    templates.mkdir()
    (templates / "system.j2").write_text("You inspect scans.\n{% if tools_summary %}\n{{ tools_summary }}\n")
    assert run(scans / "part0.pcd", "--bank", bank, "--out", out, "--templates", templates) == 2
    assert f"{templates / 'system.j2'}:3: template syntax error" in " ".join(capsys.readouterr().out.split())
    assert not out.exists()


@pytest.mark.parametrize("name, body, expected", [
    ("system.j2", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "blocked by the sandbox"),  # Python internals
    ("system.j2", "{{ tools_summary }} {{ no_such_variable }}", "'no_such_variable' is undefined"),
    # a tool result the loop would have turned into a failed call for the model, scan after scan
    ("tool_result.j2", "{{ name }}: {{ data.no_such_key }}", "has no attribute 'no_such_key'"),
])
def test_a_user_template_failing_at_render_time_exits_2_and_writes_nothing(bank, scans, tmp_path, capsys, name,
                                                                           body, expected):
    templates, out = tmp_path / "templates", tmp_path / "out"
    templates.mkdir()
    (templates / name).write_text(body)
    assert run(scans / "part0.pcd", "--bank", bank, "--out", out, "--templates", templates) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert f"{templates / name}:" in printed and expected in printed
    assert not out.exists()


# ----------------------------------------------------------------------------- item 7: two writers, one folder
def write_scan_output(target: Path, who: str) -> None:
    with staged_dir(target) as folder:
        (folder / "who.txt").write_text(who)


def write_fit(target: Path, who: str) -> None:
    fitted = fit_class(part_scans(2, 600, seed=1), TINY_FIT)
    fitted.info["who"] = who
    fitted.save(target)


def writer_of(folder: Path) -> str:
    if (folder / "who.txt").exists():
        return (folder / "who.txt").read_text()
    return FittedClass.load(folder).info["who"]


@pytest.mark.parametrize("write", [write_scan_output, write_fit], ids=["scan output", "fitted class"])
def test_a_second_writer_landing_during_the_swap_does_not_break_the_first(tmp_path, monkeypatch, write):
    """The interleaving the issue saw: writer A has cleared the way and is about to rename its folder into place
    when writer B puts its own complete output there. Driven deterministically: B runs inside A's first rename."""
    target = tmp_path / "part0"
    write(target, "earlier run")
    real = {"rename": os.rename, "replace": os.replace}
    raced = []

    def racing(name):
        def move(src, dst, *args, **kwargs):
            if not raced and Path(dst) == target and Path(src).parent == tmp_path:
                raced.append(True)
                write(target, "B")  # the other process, start to finish
            return real[name](src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", racing("rename"))
    monkeypatch.setattr(os, "replace", racing("replace"))
    write(target, "A")
    assert raced, "the race was not driven: no folder was renamed onto the target"
    assert writer_of(target) == "A" and leftovers(tmp_path) == []
