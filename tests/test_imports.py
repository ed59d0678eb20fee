"""The package's layering: no import circle anywhere in app/, and the API reads no engine internals."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each app module -> the app modules it imports (those under TYPE_CHECKING included)."""
    modules = {module_name(p): p for p in APP.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle (its modules in order), or [] when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        path.append(node)
        for nxt in sorted(graph[node]):
            if found := visit(nxt):
                return found
        path.pop()
        done.add(node)
        return []

    for start in sorted(graph):
        if found := visit(start):
            return found
    return []


def test_no_import_circle_anywhere_in_app() -> None:
    graph = imports()
    assert "app.engine.engine" in graph and "app.api.serving" in graph  # the walk found the package
    assert cycle(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) == []


def test_the_api_uses_the_engine_through_its_interface_modules() -> None:
    graph = imports()
    allowed = {"app.engine.engine", "app.engine.stream", "app.engine.sequence", "app.engine.sampling",
               "app.engine.inspect", "app.engine.config"}  # fmt: skip
    for name, deps in graph.items():
        if name.startswith("app.api"):
            engine = {d for d in deps if d.startswith("app.engine.")}
            assert engine <= allowed, (name, engine - allowed)


def test_no_module_the_server_loads_imports_the_tools() -> None:
    graph = imports()
    served, seen = ["app.main"], set()
    while served:
        name = served.pop()
        if name not in seen:
            seen.add(name)
            served.extend(graph[name])
    assert "app.api.serving" in seen  # the walk follows the server's imports
    assert not {m for m in seen if m.startswith("app.tools")}
    assert {"app.tools.bench", "app.tools.loadtest", "app.tools.cluster", "app.tools.readme"} <= set(graph)
