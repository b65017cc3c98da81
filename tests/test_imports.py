"""The package's import graph: no cycles, and the engine depends on no later stage of the data flow.

Every `import` statement counts, at module level, inside functions and under `TYPE_CHECKING`:
a lazy import only hides a cycle until someone moves it to the top.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE_DIR = REPO / "mee_bench"
LATER_STAGES = ("harness", "sweep", "calibrate", "train", "study")
ENGINE_MAY_IMPORT = ("mee_bench.engine", "mee_bench.paths")  # the engine uses nobody in the project but where files are


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The `mee_bench` modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` imports the module; `from module import name` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def test_the_graph_sees_module_level_and_function_level_imports():
    graph = import_graph()
    assert "mee_bench.sweep.store" in graph["mee_bench.sweep.runner"]  # module level
    assert "mee_bench.sweep.leaderboard" in graph["mee_bench.sweep.runner"]  # inside cli()
    assert "mee_bench.study.plots" in graph["mee_bench.study.analysis"]  # inside cli()


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_the_engine_imports_no_later_stage_and_nothing_above_it():
    graph = import_graph()
    arrows_up = {
        name: sorted(target for target in targets if not target.startswith(ENGINE_MAY_IMPORT))
        for name, targets in graph.items()
        if name.startswith("mee_bench.engine")
    }
    assert {name: targets for name, targets in arrows_up.items() if targets} == {}
    later = {f"mee_bench.{stage}" for stage in LATER_STAGES}
    assert later <= {name.rpartition(".")[0] or name for name in graph} | set(graph)  # every stage named exists
