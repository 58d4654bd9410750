"""The import graph, read from the source with ``ast``: the engine imports no stage; no module imports itself
back through others (module-level and function-level imports alike)."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGES = ("pipeline", "stages")
FACE = ("pipeline.cli",)  # the command line may know both the engine and the stages


def project_modules() -> dict[str, ast.Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return modules


def imported(name: str, tree: ast.Module, modules: dict) -> set[str]:
    """The project modules ``name`` imports anywhere in its code, with the packages Python runs on the way
    (``stages.batch`` importing ``pipeline.cursor`` runs ``pipeline`` first), less its own packages."""
    is_package = name in modules and any(m.startswith(name + ".") for m in modules)
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    out = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and not (name == prefix or name.startswith(prefix + ".")):
                out.add(prefix)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(name, tree, modules) for name, tree in modules.items()}


def test_the_graph_is_read():
    edges = graph()
    assert "pipeline.cursor" in edges["stages.batch"] and "pipeline" in edges["stages.batch"]
    assert "stages.tokens.prepare" in edges["pipeline.cli.prepare"]
    assert "stages.tokens.local_engine" in edges["stages.tokens.prepare"]  # `from stages.tokens import local_engine`


def test_the_engine_imports_no_stage():
    edges = graph()
    engine = [name for name in edges if name.startswith("pipeline") and not name.startswith(FACE)]
    assert len(engine) >= 10
    for name in engine:
        stages = sorted(target for target in edges[name] if target.split(".")[0] == "stages")
        assert not stages, f"{name} imports {stages}"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "visiting", "import cycle: " + " -> ".join(path[path.index(name) :] + [name])
        state[name] = "visiting"
        for target in sorted(edges[name]):
            visit(target, path + [name])
        state[name] = "done"

    for name in sorted(edges):
        visit(name, [])
