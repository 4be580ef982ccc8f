"""The import graph keeps DESIGN.md's layers: conf < datasets < cluster < trainers < serve < launch.py. A module
imports only from its own layer or below, and no modules import each other in a circle. Imports inside
functions count too: a deferred import is still a dependency."""

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

LAYERS = ("conf", "datasets", "cluster", "trainers", "serve", "launch")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [REPO_ROOT / "launch.py"]
    for layer in LAYERS[:-1]:
        files += sorted((REPO_ROOT / layer).rglob("*.py"))
    return {_module_name(path): path for path in files}


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (a `from package import name` counts as the module `package.name`
    when that is a module, else as the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in LAYERS and name in known)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path, known) - {name} for name, path in known.items()}


def test_every_import_goes_down_the_layers(graph):
    upward = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
              if LAYERS.index(target.split(".")[0]) > LAYERS.index(module.split(".")[0])]
    assert not upward, upward


def test_no_modules_import_each_other_in_a_circle(graph):
    circles = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles
