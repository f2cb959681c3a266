"""The house rules of DESIGN.md, checked on the source: floors import only downward and no import circle exists.

Every import counts, the lazy ones inside functions too (they are still dependencies), and a
name taken from a package with lazy exports (`from editors import LVLM`) counts as an import of
the module that defines it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ["memory", "editors", "monitor", "simulator"]  # bottom to top


def _modules() -> dict[str, Path]:
    found = {}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _target(module: str, name: str | None) -> str | None:
    """The project module an import names: `from pkg import Name` resolves lazy exports and submodules."""
    if name is not None:
        if f"{module}.{name}" in MODULES:
            return f"{module}.{name}"
        exports = getattr(importlib.import_module(module), "_EXPORTS", {}) if module in FLOORS else {}
        if name in exports:
            return exports[name]
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [_target(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [_target(node.module, alias.name) for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t is not None and t != module}
    return found


GRAPH = {module: imports(module) for module in MODULES}


def floor(module: str) -> int:
    return FLOORS.index(module.partition(".")[0])


def test_the_graph_sees_lazy_and_package_imports():
    """Guards the checker itself: a lazy import inside a function and a lazily exported name are edges."""
    assert "simulator.run" in GRAPH["simulator.train_editor"]  # imported inside main()
    assert "editors.adapter" in GRAPH["simulator.run"]  # `from editors import LVLM`
    assert "memory.files" in GRAPH["editors.state"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_point_down(module):
    upward = sorted(t for t in GRAPH[module] if floor(t) > floor(module))
    assert not upward, f"{module} imports from a higher floor: {upward}"


def test_no_import_circle():
    """Depth-first search for a back edge; the message names the circle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
