"""The package's import graph: layers import downward only.

Every import of a saft_hf module counts, also those inside functions (deferred for start-up time): if one of them
closed a cycle, it would be an import placed in a function to dodge the cycle, which the house rules forbid. So does
the package initialisation an import implies: importing ``saft_hf.merging.methods`` first runs
``saft_hf/merging/__init__.py``, and whatever that imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "saft_hf"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def import_graph() -> dict[str, set[str]]:
    """``{module: saft_hf modules it imports}`` over every .py file of the package (a ``from X import y`` counts as
    importing ``X.y`` when that is a module, else ``X``; importing a module counts as importing the packages that hold
    it, except those that hold the importer, which are already being initialised)."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, is_package, node)
                for alias in node.names:
                    targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in paths else source)
        own_packages = _packages(module) | {module}
        graph[module] = {
            imported
            for target in targets
            if target in paths
            for imported in _packages(target) | {target}
            if imported in paths and imported not in own_packages
        }
    return graph


def _packages(module: str) -> set[str]:
    """The packages that hold ``module``: ``a.b.c`` -> ``{a, a.b}``."""
    parts = module.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts))}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if state.get(target) is None and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if state.get(module) is None and (cycle := visit(module)):
            return cycle
    return None


def test_importing_a_module_counts_as_importing_its_packages():
    graph = import_graph()
    # cli imports saft_hf.merging.config (deferred), which initialises saft_hf.merging first
    assert "saft_hf.merging" in graph["saft_hf.cli"]
    assert "saft_hf.merging" not in graph["saft_hf.merging.engine"]  # its own package is already being initialised


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "saft_hf.io.reading" in graph and "saft_hf.hub" in graph["saft_hf.model_weights"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


@pytest.mark.parametrize(
    ("layer", "allowed"),
    [
        # The leaves.
        ("saft_hf.layout", set()),
        ("saft_hf.errors", set()),
        ("saft_hf.lazy", set()),
        # Hub access resolves references to local folders and pushes folders; it knows no checkpoint format.
        ("saft_hf.hub", {"saft_hf.errors", "saft_hf.layout"}),
        # Checkpoint I/O knows nothing of the Hub, of task vectors or of merging.
        ("saft_hf.io", {"saft_hf.errors", "saft_hf.layout"}),
    ],
)
def test_low_layers_import_only_what_is_below_them(layer, allowed):
    graph = import_graph()
    modules = [module for module in graph if module == layer or module.startswith(layer + ".")]
    assert modules
    outside = {
        (module, target)
        for module in modules
        for target in graph[module]
        if not (target == layer or target.startswith(layer + ".") or target in allowed)
    }
    assert outside == set()
