"""The package has no import cycles: the module graph of `dync/`, read from source with `ast`, is a DAG.

Every import of a `dync` module counts, at module level or inside a function (a deferred import is still a
dependency), except those under `if TYPE_CHECKING:`. `from X import Y` is an edge to `X.Y` when that is a
module, else to `X`; relative imports are resolved; a module does not depend on its parent packages unless
it imports them. Nothing is imported, so this is fast and independent of torch, onnx and the rest.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

Graph = dict[str, dict[str, list["Edge"]]]
"""module -> imported module -> the import statements that make that edge."""


@dataclass(frozen=True)
class Edge:
    """One import statement of `target` in `source`, at `file:line`."""

    source: str
    target: str
    file: str
    line: int


def find_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` (the directory `root / package`) by dotted name: a package by its name (its
    `__init__.py`; a directory without one, a namespace package, by the directory, which holds no imports)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        for end in range(1, len(parts)):
            modules.setdefault(".".join(parts[:end]), root.joinpath(*parts[:end]))
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an `if` test is `TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement anywhere in `tree` (functions and classes included) but under `if TYPE_CHECKING:`
    (its `else:` branch does run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is a module, else its longest prefix that is one (None if no prefix is)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, modules: dict[str, Path]) -> list[str]:
    """The modules of `modules` that one import statement in `module` depends on."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the package holding `module` (itself if it is a package), up level - 1
            package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = (_known(name, modules) for name in names)
    return sorted({name for name in found if name is not None})


def import_graph(root: Path, package: str) -> Graph:
    """The import graph of `package` under `root`: only edges between its own modules."""
    modules = find_modules(root, package)
    graph: Graph = {name: defaultdict(list) for name in modules}
    for module, path in modules.items():
        if path.is_dir():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in runtime_imports(tree):
            for target in imported_modules(node, module, modules):
                edge = Edge(module, target, path.relative_to(root).as_posix(), node.lineno)
                graph[module][target].append(edge)
    return graph


def strongly_connected_components(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in reverse topological order, members sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _path_back(graph: Graph, start: str, goal: str, within: set[str]) -> list[str]:
    """A shortest path `start -> ... -> goal` inside `within` (breadth first; one exists in an SCC)."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while goal not in previous:
        assert frontier, f"{goal} is not reachable from {start}"
        reached = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ in within and succ not in previous:
                    previous[succ] = node
                    reached.append(succ)
        frontier = reached
    path: list[str] = []
    step: str | None = goal
    while step is not None:
        path.append(step)
        step = previous[step]
    return path[::-1]


def find_cycles(graph: Graph) -> list[list[str]]:
    """Cycles `[a, b, ..., a]` covering every import edge that lies on a cycle: self-imports, and for each edge
    `u -> v` inside a strongly connected component, `u -> v` then a shortest way back to `u`."""
    cycles: dict[tuple[str, ...], list[str]] = {}
    for component in strongly_connected_components(graph):
        members = set(component)
        for source in component:
            for target in sorted(graph[source]):
                if target not in members:
                    continue
                cycle = [source] if target == source else [source, *_path_back(graph, target, source, members)[:-1]]
                start = cycle.index(min(cycle))
                key = tuple(cycle[start:] + cycle[:start])  # one cycle is found from each of its edges
                cycles.setdefault(key, [*key, key[0]])
    return sorted(cycles.values())


def describe_cycles(graph: Graph, cycles: list[list[str]]) -> str:
    """Each cycle as `a -> b -> ... -> a`, then each of its imports with file and line, to see what to cut."""
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        for source, target in pairwise(cycle):
            where = ", ".join(f"{edge.file}:{edge.line}" for edge in graph[source][target])
            lines.append(f"    {source} -> {target}  ({where})")
    return "\n".join(lines)


def test_dync_has_no_import_cycles() -> None:
    graph = import_graph(REPO, "dync")
    assert len(graph) > 10 and graph["dync"], "the scan found too little; did the layout change?"
    cycles = find_cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) in dync/:\n{describe_cycles(graph, cycles)}"


def test_finds_a_cycle_in_a_synthetic_package(tmp_path: Path) -> None:
    """a -> b at module level and b -> a inside a function (relative): a cycle; e imports itself. c imports a
    only under TYPE_CHECKING, sub.d imports its parent packages explicitly, ns is a namespace package (no
    `__init__.py`): none of these closes a cycle."""
    files = {
        "__init__.py": "",
        "a.py": "from pkg import b\nfrom pkg.sub import d\nfrom pkg.ns import x\n",
        "b.py": "def f():\n    from . import a\n    return a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\nelse:\n    import os\n",
        "sub/__init__.py": "",
        "sub/d.py": "import pkg.c\nfrom .. import not_a_module\nfrom . import d\n",
        "ns/x.py": "from pkg.ns import something\n",
        "e.py": "import pkg.e\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert sorted(graph["pkg.a"]) == ["pkg.b", "pkg.ns.x", "pkg.sub.d"]
    assert sorted(graph["pkg.b"]) == ["pkg.a"] and graph["pkg.b"]["pkg.a"][0].line == 2
    assert not graph["pkg.c"], "imports under TYPE_CHECKING are not dependencies"
    assert sorted(graph["pkg.sub.d"]) == ["pkg", "pkg.c", "pkg.sub.d"]
    assert sorted(graph["pkg.ns.x"]) == ["pkg.ns"] and not graph["pkg.ns"]
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.e", "pkg.e"], ["pkg.sub.d", "pkg.sub.d"]]
    message = describe_cycles(graph, cycles)
    assert "pkg.a -> pkg.b -> pkg.a\n" in message
    assert "pkg.a -> pkg.b  (pkg/a.py:1)" in message and "pkg.b -> pkg.a  (pkg/b.py:2)" in message
    assert "pkg.e -> pkg.e  (pkg/e.py:1)" in message and "pkg.sub.d -> pkg.sub.d  (pkg/sub/d.py:3)" in message
