"""The package's import graph has no cycle.

Modules are read with `ast`, not imported. An edge A -> B is an import of B in A: `import a.b` and
`from a.b import x` reach a.b and, unless A lies inside them, the packages above it (their __init__ runs
first); `from a import b` reaches the submodule a.b when there is one. Imports under `if TYPE_CHECKING:`
never run and are ignored. Two graphs are checked: the module-level imports (what runs on import), and all
imports including those inside functions (an import deferred into a function still closes a cycle once the
function runs). The one deferred import left out of the second graph is that of a module which itself needs an
optional dependency at its top (lm-eval, ray): that import is the door the optional dependency requires, taken
only once the dependency is known to be there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cachemedicpp import ROOT

PACKAGE = "cachemedicpp"
OPTIONAL = ("lm_eval", "ray")  # optional dependencies: a module importing one at its top is imported on demand


def modules() -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} of every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.Module, nested: bool) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import statement, deferred?) of a module: its top level (with `nested`, also those inside functions,
    deferred), skipping `if TYPE_CHECKING:` blocks."""
    out, todo = [], [(node, False) for node in tree.body]
    while todo:
        node, deferred = todo.pop(0)
        if _is_type_checking(node):
            todo.extend((n, deferred) for n in node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append((node, deferred))
            continue
        inner = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if inner and not nested:
            continue
        todo.extend((n, inner) for n in ast.iter_child_nodes(node))
    return out


def _needs_optional(path: Path) -> bool:
    """Whether the module imports an optional dependency at its top."""
    for node, _ in _imports(ast.parse(path.read_text(encoding="utf-8")), nested=False):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if any(n.split(".")[0] in OPTIONAL for n in names) and not getattr(node, "level", 0):
            return True
    return False


def _reached(name: str, importer: str, known) -> set[str]:
    """Package modules an import of `name` runs: it and the packages above it that do not hold the importer."""
    parts = name.split(".")
    out = set()
    for i in range(1, len(parts) + 1):
        mod = ".".join(parts[:i])
        if mod in known and not (importer == mod or importer.startswith(mod + ".")):
            out.add(mod)
    return out


def graph(nested: bool) -> dict[str, set[str]]:
    mods = modules()
    optional = {m for m, (path, _) in mods.items() if _needs_optional(path)}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        here = mod if is_pkg else mod.rpartition(".")[0]
        for node, deferred in _imports(ast.parse(path.read_text(encoding="utf-8")), nested):
            reached: set[str] = set()
            if isinstance(node, ast.Import):
                for alias in node.names:
                    reached |= _reached(alias.name, mod, mods)
            else:
                base = node.module or ""
                if node.level:  # relative: from the importer's package, level - 1 packages up
                    up = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                reached |= _reached(base, mod, mods)
                for alias in node.names:
                    if f"{base}.{alias.name}" in mods:
                        reached |= _reached(f"{base}.{alias.name}", mod, mods)
            edges[mod] |= reached - optional if deferred else reached
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_closed_path(edges, comp) for comp in comps]


def _closed_path(edges: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(comp)
    prev = {start: None}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(edges[v] & comp):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [start] + path[::-1][1:] + [start] if path[-1] == start else path[::-1] + [start]
            if w not in prev:
                prev[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def _report(found: list[list[str]]) -> str:
    return "import cycle(s):\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_the_graph_sees_the_package():
    edges = graph(nested=True)
    assert "cachemedicpp.corruption.registry" in edges["cachemedicpp.corruption.corruptor"]
    assert "cachemedicpp.lmeval" in edges["cachemedicpp.tasks"]  # the package's __init__
    assert "cachemedicpp.lmeval.adapter" not in edges["cachemedicpp.tasks"]  # deferred: it needs lm-eval
    assert "cachemedicpp.examples" in edges["cachemedicpp.lmeval.adapter"]
    assert "cachemedicpp.pipeline" in edges["cachemedicpp.sweep.plan"]
    assert "cachemedicpp.train" in edges["cachemedicpp.pipeline"]  # deferred, kept in the second graph
    assert "cachemedicpp.train" not in graph(nested=False)["cachemedicpp.pipeline"]


def test_cycles_are_found_and_printed():
    found = cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert found == [["a", "b", "c", "a"]]
    assert "a -> b -> c -> a" in _report(found)


@pytest.mark.parametrize("nested", [False, True], ids=["module-level", "with-function-level"])
def test_no_import_cycle(nested):
    found = cycles(graph(nested))
    if found:
        print(_report(found))
    assert not found, _report(found)
