"""The package's import graph has no cycles: neither between modules nor between its subpackages.

Every module of backend_src/multilora is parsed with `ast` (nothing is imported): every import
statement at any depth counts, lazy ones inside functions too, except those under
`if TYPE_CHECKING:` (annotations only, never run). A cycle fails with the cycle spelled out, so
the fix starts from the message. The subpackages (engine, lora, adapters, cuda, models, triton,
launcher, demo) and the top-level modules (config, errors, events, ...) are the nodes of the
second graph: an edge between two of them is any import from a module of one into the other.
"""
from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "backend_src" / "multilora"
SUBPACKAGES = ("engine", "lora", "adapters", "cuda", "models", "triton", "launcher", "demo")

Graph = dict[str, set[str]]


def module_files(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package (a package is its __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements under `node` at any depth, leaving out the bodies of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            yield from _imports(ast.Module(body=child.orelse, type_ignores=[]))  # `else:` does run
        else:
            yield from _imports(child)


def _absolute(statement: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module `from ... import` names, with a relative import resolved against `module`."""
    if not statement.level:
        return statement.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (statement.level - 1)]
    return ".".join(base + ([statement.module] if statement.module else []))


def import_graph(modules: dict[str, Path]) -> Graph:
    """{module: the package's modules it imports}; `from pkg import name` is an edge to pkg.name
    when that is a module, else to pkg."""
    graph: Graph = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for statement in _imports(tree):
            if isinstance(statement, ast.Import):
                targets = [alias.name for alias in statement.names]
            else:
                source = _absolute(statement, name, path.name == "__init__.py")
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in statement.names]
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def room(module: str) -> str:
    """The node of the subpackage graph a module belongs to: its subpackage, or itself at the top."""
    parts = module.split(".")
    return ".".join(parts[:2])


def room_graph(graph: Graph) -> Graph:
    rooms: Graph = {}
    for source, targets in graph.items():
        rooms.setdefault(room(source), set()).update(room(t) for t in targets if room(t) != room(source))
    return rooms


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle as a path that returns to its start ([a, b, a]), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(module_files())


def test_the_parser_sees_the_imports_that_matter(graph):
    """Guards against a vacuous pass: lazy imports count and TYPE_CHECKING ones do not, known edges
    of the package are found (relative ones too), and a cycle is found when there is one."""
    source = ("import a\nif TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
              "def f():\n    from .d import e\n")
    found = [node.names[0].name if isinstance(node, ast.Import) else node.module
             for node in _imports(ast.parse(source))]
    assert found == ["a", "c", "d"]
    assert set(SUBPACKAGES) <= {room(m).removeprefix("multilora.") for m in graph}
    assert "multilora.lora.layers" in graph["multilora.engine.assembly"]  # relative, `from ..lora.layers`
    assert "multilora.lora.native" in graph["multilora.lora.backends"]  # `from .. import native`
    assert "multilora.cuda.module" in graph["multilora.engine.assembly"]
    assert "multilora.cuda.paged_decode" not in graph["multilora.models.attention"]  # TYPE_CHECKING only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_cycle_between_modules(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle or [])


def test_no_cycle_between_subpackages(graph):
    rooms = room_graph(graph)
    cycle = find_cycle(rooms)
    if cycle is not None:
        pytest.fail("import cycle between subpackages: " + " -> ".join(cycle) + "\n"
                    + "\n".join(_behind(graph, a, b) for a, b in itertools.pairwise(cycle)))


def _behind(graph: Graph, source_room: str, target_room: str) -> str:
    """The module imports that make the edge source_room -> target_room."""
    imports = sorted(f"{s} imports {t}" for s, targets in graph.items() for t in targets
                     if room(s) == source_room and room(t) == target_room)
    return f"{source_room} -> {target_room}: " + "; ".join(imports)
