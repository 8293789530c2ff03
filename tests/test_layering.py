"""The import structure: a module imports only downward (``kernels`` <- ``ranking`` <- ``serving``
<- ``benchmarks``), and no two modules import each other, directly or round a loop (a loop
means one concept is split in the wrong place). Read from the source with ``ast``: imports
inside functions count too. ``ranking.cli``, the ``mixrank`` entry point, registers command
modules of every package by name and is the one module allowed above all of them."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "ranking", "serving", "benchmarks")  # each may import those before it
ENTRY_POINTS = {"ranking.cli"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    mods = {_module(p): p for pkg in LAYERS for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in mods else base)
        graph[mod] = {t for t in targets if t in mods and t != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    g = import_graph()
    # ranking.model.ranker imports the baselines inside build_model only
    assert "ranking.model.baselines" in g["ranking.model.ranker"]
    assert "ranking.train.trainer" in g["ranking.train.worker"]


def test_modules_import_only_downward():
    layer = {name: i for i, name in enumerate(LAYERS)}
    upward = [
        f"{mod} -> {t}"
        for mod, targets in import_graph().items()
        if mod not in ENTRY_POINTS
        for t in targets
        if layer[t.split(".")[0]] > layer[mod.split(".")[0]]
    ]
    assert upward == []


def test_no_import_loops():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_files_named_in_the_source_exist():
    """A comment or docstring that points at a file of the repository points at one that is
    there (``docs/...``, ``serving/...``, ``deploy/...``, ...)."""
    import re

    named = re.compile(
        r"(?<![\w/.])((?:docs|serving|ranking|kernels|benchmarks|deploy|helm|configs|tests)/"
        r"[\w./-]*\w\.(?:py|md|yaml|yml|json|cpp|c|proto|sh|png|tpl|txt))(?![\w])"
    )
    missing = []
    for pkg in (*LAYERS, "tests", "deploy", "helm"):
        for path in (REPO / pkg).rglob("*"):
            if path.suffix not in (".py", ".yaml", ".tpl", ".cpp", ".c", ".sh") or "*" in path.name:
                continue
            for m in named.finditer(path.read_text(errors="replace")):
                if not (REPO / m.group(1)).exists():
                    missing.append(f"{path.relative_to(REPO)}: {m.group(1)}")
    assert missing == []
