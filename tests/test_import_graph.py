"""The project's modules import each other without cycles, and pipeline/ imports nothing from launchers/ or
data_prep/ (module-level and function-level imports alike: a lazy import inside a function hides a cycle or an
upward arrow until the day someone hoists it)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "launchers", "data_prep", "benchmarks")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """{module: project modules it imports}; ``from pkg import mod`` counts as importing ``pkg.mod``."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target)
                if found and found != mod and not mod.startswith(found + "."):   # a package's own __init__
                    graph[mod].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert "pipeline.data.ffcv_pipelines" in graph["pipeline.data.ffcv_loader"]   # the graph sees imports
    assert cycles(graph) == []


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_package_sits_low():
    """pipeline.config imports no other project module but leaves (modules that import none, e.g.
    pipeline.redaction): everything (schedules, checkpointing, loaders, the trainer, the launchers) may read
    configs without a cycle."""
    graph = import_graph()
    config = [m for m in graph if m == "pipeline.config" or m.startswith("pipeline.config.")]
    assert len(config) > 1   # the package and its modules
    assert "pipeline.redaction" in graph["pipeline.config.errors"] and not graph["pipeline.redaction"]
    outside = {m: sorted(d for d in graph[m] if not d.startswith("pipeline.config") and graph.get(d))
               for m in config}
    assert all(not deps for deps in outside.values()), outside


def upward_imports(graph: dict[str, set[str]], lower: str = "pipeline",
                   upper: tuple[str, ...] = ("launchers", "data_prep")) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module of the ``lower`` layer imports one of the ``upper`` layers."""
    def package(mod: str) -> str:
        return mod.split(".")[0]

    return sorted((mod, target) for mod, targets in graph.items() if package(mod) == lower
                  for target in targets if package(target) in upper)


def test_pipeline_imports_nothing_from_launchers_or_data_prep():
    """Layers, no arrow back up: data_prep/ writes files, pipeline/ trains on them, launchers/ submits pipeline/
    (module-level and function-level imports alike)."""
    graph = import_graph()
    assert "pipeline.storage" in graph["data_prep.atomic"]   # the graph sees the arrows that are allowed
    assert upward_imports(graph) == []


def test_upward_import_detection_finds_one():
    graph = {"pipeline.a": {"pipeline.b"}, "pipeline.b": {"launchers.site"}, "data_prep.c": {"pipeline.a"},
             "launchers.site": {"pipeline.a"}, "pipeline.d": {"data_prep.c"}}
    assert upward_imports(graph) == [("pipeline.b", "launchers.site"), ("pipeline.d", "data_prep.c")]
