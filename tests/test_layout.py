"""The house: each top-level package is one stage of the flow, and imports only point down the stages.

The order is `evals -> agent -> verbalize -> tools -> detector -> scans` (README, Layout); `prompts/` is data
that any
stage may read and that reads nothing. Every import counts, including the ones inside functions: a lazy import
is
still a dependency, it only moves the failure to run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("scans", "detector", "tools", "verbalize", "agent", "evals")  # lowest first
DATA_PACKAGES = ("prompts",)
PROJECT_PACKAGES = (*STAGES, *DATA_PACKAGES)
MAX_MODULE_LINES = 450


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in (*STAGES, *DATA_PACKAGES):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str], missing: set[str] | None = None) -> set[str]:
    """The project modules a module imports, anywhere in its body; `from a import b` names `a.b` when b is a
    module.
    Imports of project modules that do not exist are added to `missing`."""
    missing = set() if missing is None else missing
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
            named = targets
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
            named = [base]
        else:
            continue
        missing.update(t for t in named if t.split(".")[0] in PROJECT_PACKAGES and t not in known)
        for target in targets:
            while (
                target and target not in known
            ):  # `import a.b.c` of a package: the deepest module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def stage_of(module: str) -> str:
    return module.split(".")[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_stage_package_exists() -> None:
    modules = module_files()
    for package in (*STAGES, *DATA_PACKAGES):
        assert package in modules, f"{package}/__init__.py is missing"


def test_imports_name_modules_that_exist() -> None:
    """A stale path (a module that moved) must fail here, not fall through to another installed copy."""
    files = module_files()
    missing: set[str] = set()
    for name, path in files.items():
        imported_modules(name, path, set(files), missing)
    for folder in ("tests", "benchmarks"):
        for path in sorted((REPO / folder).glob("*.py")):
            imported_modules(
                f"{folder}.{path.stem}",
                path,
                set(files) | {f"tests.{p.stem}" for p in (REPO / "tests").glob("*.py")},
                missing,
            )
    assert not missing, f"imports of modules that do not exist: {sorted(missing)}"


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_point_down_the_stages() -> None:
    rank = {stage: i for i, stage in enumerate(STAGES)}
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            source_stage, target_stage = stage_of(module), stage_of(target)
            if source_stage in DATA_PACKAGES:
                upward.append(f"{module} -> {target} (prompts/ is data and imports nothing)")
            elif target_stage in rank and rank[target_stage] > rank[source_stage]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a later stage:\n" + "\n".join(sorted(upward))


def test_tools_import_neither_torch_nor_the_detector() -> None:
    """The agent's tools are plain functions over numbers: importing them must not load torch or the detector,
    directly or through anything they import (checked in a fresh interpreter)."""
    tools = sorted(m for m in module_files() if stage_of(m) == "tools")
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in tools)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'detector'))\n"
        "print(','.join(bad))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", f"importing tools/ loaded: {run.stdout.strip()[:300]}"


@pytest.mark.parametrize("module", sorted(module_files()))
def test_module_is_small(module: str) -> None:
    lines = module_files()[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_MODULE_LINES, (
        f"{module} has {lines} lines (at most {MAX_MODULE_LINES}): split it by idea"
    )


def documented_commands() -> list[str]:
    """Every `python -m <module>` of this project that README.md shows: command lines are contracts."""
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    packages = (*STAGES, *DATA_PACKAGES)
    return sorted({m for m in re.findall(r"python -m ([\w.]+)", readme) if m.split(".")[0] in packages})


@pytest.mark.parametrize("module", documented_commands())
def test_documented_command_still_runs(module: str) -> None:
    """`python -m <module> --help` works, served by this checkout (not by another install of the package)."""
    code = (
        f"import importlib.util, runpy, sys\n"
        f"print('origin:', importlib.util.find_spec({module!r}).origin)\n"
        f"sys.argv = [{module!r}, '--help']\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"python -m {module} --help failed:\n{run.stderr[-2000:]}"
    origin = Path(run.stdout.split("origin:", 1)[1].split("\n", 1)[0].strip())
    assert origin.is_relative_to(REPO), f"python -m {module} runs {origin}, not this checkout's module"
    assert "usage:" in run.stdout
