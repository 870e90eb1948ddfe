"""The import structure: no cycles among privfed's own modules, and the layering rules.

The graph is built from the source with ``ast``, so it holds every import: at module
level, inside functions (lazy imports still form a cycle) and under ``TYPE_CHECKING``.
``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.
Rules (docs/ARCHITECTURE.md): ``server/`` and ``client/`` import from ``common/`` and
never from each other; ``common/`` imports neither.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "server", "client", "simulations")

# Cycles known and being removed, as the set of modules in the cycle (none today). An
# entry whose cycle is gone fails test_allowed_cycles_still_exist, so the list stays true.
ALLOWED_CYCLES: list[frozenset[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """privfed modules that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            # The longest privfed module the name starts with (``import a.b.c`` imports a.b.c).
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a -> b -> ... -> a) per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(component)
    parent: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_the_graph_sees_lazy_and_type_checking_imports():
    graph = import_graph()
    # common.tasks.base imports RunConfig only under TYPE_CHECKING.
    assert "common.config" in graph["common.tasks.base"]
    assert "common.config.loading" in graph["common.config"]  # inside __getattr__


def test_no_import_cycles():
    found = [c for c in cycles(import_graph()) if frozenset(c) not in ALLOWED_CYCLES]
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_allowed_cycles_still_exist():
    """An allow-list entry whose cycle is gone must be deleted (it would hide a new one)."""
    present = {frozenset(c) for c in cycles(import_graph())}
    assert [sorted(c) for c in ALLOWED_CYCLES if c not in present] == []


@pytest.mark.parametrize(
    "layer, forbidden", [("server", ("client",)), ("client", ("server",)), ("common", ("server", "client"))]
)
def test_layers(layer, forbidden):
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        if mod.split(".")[0] == layer
        for dep in deps
        if dep.split(".")[0] in forbidden
    ]
    assert not bad, "\n".join(bad)


def test_every_module_imports():
    failed = []
    for name in all_modules():
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every module that fails, not the first
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not failed, "\n".join(failed)
