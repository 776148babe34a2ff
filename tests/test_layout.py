"""The package's import graph: no cycle, and no import from a lower wing to a higher one.

Every ``import`` of ``dynamo_dist`` modules counts, at module level or inside a function (a lazy
import is still a dependency), ``TYPE_CHECKING`` ones too. Wings, lowest first (``LAYERS``):
a module may import its own wing, and wings below it. The checker is run on a small synthetic
package first (an upward import and a cycle it must report), then on the real one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dynamo_dist"

# wing (a module or a package of dynamo_dist) -> layer; a module imports only its layer and those below
LAYERS = {
    "config": 0, "data": 0, "ray_utils": 0,      # configuration, the on-disk contracts, Ray helpers
    "family": 0,                                  # the architecture-family interface and registry
    "pca": 1, "plots": 1, "tracking": 1,          # shared tools the stages call (never the reverse)
    "zoo": 2, "adapters": 2,                      # base models
    "population": 3,                              # train and record base models
    "meta": 4,                                    # the meta-model and its training
    "families": 4,                                # the built-in families (their models and meta-models)
    "analysis": 5,                                # analyses of a finished meta run
    "pipeline": 6,                                # the stages in order, seed training
    "cli": 7, "__init__": 7,                      # entry points
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, for every .py file under ``root`` (a package dir)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import pkg.mod.attr` -> the longest module prefix
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """'a -> b' for every import whose target's wing is in a higher layer than the importer's;
    a wing missing from ``layers`` is reported too (every module must be placed)."""
    bad = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            a, b = wing(mod), wing(t)
            if a not in layers or b not in layers:
                bad.append(f"{mod} -> {t} (wing {a if a not in layers else b!r} has no layer)")
            elif layers[b] > layers[a]:
                bad.append(f"{mod} -> {t} (layer {layers[a]} imports layer {layers[b]})")
    return bad


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "def f():\n    from .high import g  # lazy: still an arrow up\n",
        "pkg/high.py": "from . import low\nfrom .sub import a\n",
        "pkg/sub/__init__.py": "from .a import x\n",
        "pkg/sub/a.py": "import pkg.sub.b\n",
        "pkg/sub/b.py": "from ..sub import a\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.low"] == {"pkg.high"} and graph["pkg.high"] == {"pkg.low", "pkg.sub.a"}
    assert graph["pkg.sub"] == {"pkg.sub.a"} and graph["pkg.sub.b"] == {"pkg.sub.a"}
    assert cycles(graph) == [["pkg.high", "pkg.low"], ["pkg.sub.a", "pkg.sub.b"]]
    layers = {"low": 0, "high": 1, "sub": 1, "__init__": 2}
    assert upward_imports(graph, layers) == ["pkg.low -> pkg.high (layer 0 imports layer 1)"]
    # control: the same package without the lazy import and with b importing nothing is clean
    (pkg / "low.py").write_text("def f():\n    return 1\n")
    (pkg / "sub" / "b.py").write_text("X = 1\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [] and upward_imports(graph, layers) == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_wing_imports_a_higher_one():
    assert upward_imports(import_graph(PACKAGE), LAYERS) == []
