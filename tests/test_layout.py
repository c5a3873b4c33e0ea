"""The package's shape: every module imports, no import cycle among its
modules, no module over 400 lines."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import flask_serverside

PACKAGE = pathlib.Path(flask_serverside.__file__).parent
MODULES = {
    ".".join(("flask_serverside", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
        ".__init__"
    ): path
    for path in sorted(PACKAGE.rglob("*.py"))
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports(name: str) -> None:
    assert importlib.import_module(name).__name__ == name


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING") or (
        isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
    )


def _module_level_imports(name: str, path: pathlib.Path) -> set[str]:
    """The package's modules that ``name`` imports when it is imported:
    ``from .`` imports at module level, outside ``if TYPE_CHECKING:``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    statements = list(ast.parse(path.read_text()).body)
    while statements:
        node = statements.pop()
        if isinstance(node, ast.If) and not _is_type_checking(node):
            statements += node.body + node.orelse
        elif isinstance(node, ast.Try):
            statements += node.body + node.orelse + node.finalbody
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found - {name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or ``None``."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for target in sorted(graph.get(node, ())):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle() -> None:
    graph = {name: _module_level_imports(name, path) for name, path in MODULES.items()}
    assert graph["flask_serverside.backends.redis"] >= {"flask_serverside.backends.caches"}
    assert _cycle(graph) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_at_most_400_lines(name: str) -> None:
    lines = MODULES[name].read_text().count("\n")
    assert lines <= 400, f"{name} has {lines} lines; split it by concern."


@pytest.mark.parametrize("name", ["store", "saving", "renewal", "changes"])
def test_the_save_path_never_imports_the_session(name: str) -> None:
    """The session calls the store; the store works from the session's
    :class:`~flask_serverside.changes.Changes` and never imports it, not
    even for type checking."""
    path = MODULES[f"flask_serverside.{name}"]
    imported = {
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }
    assert "session" not in imported, f"{name} imports the session module."
