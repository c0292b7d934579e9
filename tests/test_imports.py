"""The package's import graph has no circles, and only the engine modules import deepspeed or FSDP.

Every import counts — at module level or inside a function (a lazy import only hides a circle) —
except those under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "ragdist"

# The engine modules: the only ones that may import deepspeed or torch's FSDP.
ENGINE_MODULES = {"ragdist.train.deepspeed_engine", "ragdist.train.deepspeed_shm", "ragdist.train.fsdp_engine"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, is_pkg: bool, mods: dict[str, Path]) -> set[str]:
    """Absolute names this module imports: `from a.b import c` is a.b.c when that is a module, else a.b
    (a package's own __init__ that a submodule import runs on the way is not counted)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for n in child.orelse:
                    visit(n)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
            visit(child)

    visit(tree)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in mods.items():
        names = _imports(path, name, path.name == "__init__.py", mods)
        graph[name] = {n for n in names if n in mods and n != name}
        external[name] = {n for n in names if n not in mods}
    return graph, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_circles():
    graph, _ = import_graph()
    assert len(graph) > 50  # the walk found the package
    assert cycles(graph) == []


def test_library_never_imports_the_recipes():
    graph, _ = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("ragdist.recipes"))
           for m, deps in graph.items() if not m.startswith("ragdist.recipes") and not m.startswith("ragdist.launch")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_only_engines_import_deepspeed_or_fsdp():
    _, external = import_graph()
    bad = {}
    for m, names in external.items():
        hits = sorted(n for n in names if n == "deepspeed" or n.startswith("deepspeed.") or "torch.distributed.fsdp" in n)
        if hits and m not in ENGINE_MODULES:
            bad[m] = hits
    assert bad == {}


if __name__ == "__main__":
    g, _ = import_graph()
    for c in cycles(g):
        print(" <-> ".join(c))
