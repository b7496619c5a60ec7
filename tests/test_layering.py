"""The package's import layering (issue 17, "the house").

- ``kernels/`` imports nothing from the package outside ``kernels/`` except the leaf modules ``config.py``
  and ``sizing.py`` (host arithmetic every layer needs; they import nothing else of the package);
- the module import graph (module-level and lazy in-function imports alike) has no cycle.

Read from the source with ``ast`` (no import side effects), so the test is fast and sees lazy imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import adakv_compile

ROOT = Path(adakv_compile.__file__).parent
PKG = "adakv_compile"
LEAVES = {f"{PKG}.config", f"{PKG}.sizing"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> nx.DiGraph:
    """Edges module -> package module it imports (``from . import x`` counts as importing ``x``)."""
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # adakv_compile.kernels.store.StoreError -> ...store
                    t = t.rpartition(".")[0]
                if t.startswith(PKG) and t != mod and not (is_pkg and mod.startswith(t)):
                    g.add_edge(mod, t)
    return g


def _without_package_inits(g: nx.DiGraph) -> nx.DiGraph:
    """A package's ``__init__`` imports its modules; importing ``pkg.mod`` runs ``pkg/__init__`` first, which
    is not an edge of the module graph (``from .kernels.store import X`` reads store, not kernels/__init__)."""
    inits = {m for m in g if (ROOT.parent / m.replace(".", "/") / "__init__.py").exists()}
    h = g.copy()
    for u, v in list(h.edges):
        if v in inits and u != PKG:
            h.remove_edge(u, v)
    h.remove_nodes_from([PKG])
    return h


def test_kernels_import_nothing_above_them():
    g = import_graph()
    kernels = f"{PKG}.kernels"
    bad = sorted((u, v) for u, v in g.edges
                 if u.startswith(kernels) and not v.startswith(kernels) and v not in LEAVES)
    assert not bad, f"kernels/ imports from above it: {bad}"


def test_leaves_are_leaves():
    g = import_graph()
    for leaf in LEAVES:
        assert set(g.successors(leaf)) <= LEAVES, f"{leaf} imports {sorted(g.successors(leaf))}"


def test_no_import_cycle():
    g = _without_package_inits(import_graph())
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles}"
