"""No import cycles (issue 14, item 5), between modules or between packages, including the ones
hidden inside functions.

The import graph is built statically with :mod:`ast` (nothing of recsys is imported, so the test
takes well under a second and sees imports that only run on some code paths):

* every ``.py`` file under ``recsys/`` and ``apps/`` is a module; a package's ``__init__.py`` is the
  package module itself (``recsys/data/__init__.py`` is ``recsys.data``);
* every ``import x`` / ``from x import y`` anywhere in a file counts: at module level, inside
  functions, methods, ``try`` blocks, ... A deferred import still runs (on the code path that needs
  it) and still ties the two modules together, so it is an edge like any other. So is an
  ``importlib.import_module(...)`` / ``__import__(...)`` of a literal name, and of an f-string such
  as ``f"{__name__}.{fmt}"`` (an edge to every module directly below the literal prefix);
* the bodies of ``if TYPE_CHECKING:`` blocks are left out: they never run, so they cannot form a
  cycle at run time (their ``else`` branches do run and are counted);
* ``from recsys.a import b`` is an edge to ``recsys.a.b`` when ``b`` is a submodule, else to
  ``recsys.a``; ``import recsys.a.b`` is an edge to ``recsys.a.b``. Relative imports are resolved
  the same way. The parent packages whose ``__init__`` Python runs on the way are not edges of
  their own (else every ``__init__`` that re-exports from its submodules would be a "cycle");
* a module importing itself is not an edge.

The package graph collapses each module to its package, the directory it lies in:
``recsys.data.adapters.criteo`` -> ``recsys.data.adapters``, ``recsys.datasets`` -> ``recsys.data``
(a package's ``__init__`` is the package). A module directly in a top-level package is its own node
(``recsys.errors``, ``recsys.cli``); ``recsys/__init__.py`` is the node ``recsys``, so
``from recsys import __version__`` is an edge into ``recsys``. Edges from a package to itself are
dropped.

Cycles are found with Tarjan's strongly connected components; every component of more than one node
is reported as the shortest cycle through each of its nodes (``a -> b -> a``), followed by the
import statements (file:line) of the edges inside it, which are the places to cut.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT_PACKAGES = ("recsys", "apps")

# module -> {imported module -> ["path/to/file.py:LINE", ...]}
Graph = dict[str, dict[str, list[str]]]


# --------------------------------------------------------------------------------------------------
# the import graph


def discover_modules(repo: Path, roots: Iterable[str]) -> dict[str, tuple[Path, bool]]:
    """Every module under the root packages: name -> (file, is_package)."""
    modules: dict[str, tuple[Path, bool]] = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            rel = path.relative_to(repo).with_suffix("")
            if any(not part.isidentifier() for part in rel.parts):
                continue  # not importable (e.g. a stray "foo-bar.py" or a __pycache__ oddity)
            parts = rel.parts
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join(parts)
            if is_package or name not in modules:  # as in Python, pkg/ wins over a stray pkg.py
                modules[name] = (path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING`` (any ``X.TYPE_CHECKING``)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _resolve(name: str, modules: Mapping[str, object]) -> str | None:
    """The module ``name`` stands for: itself if it is one of ours, else its longest prefix that is
    (``recsys.spec.Spec`` -> ``recsys.spec``); None outside our packages."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _dynamic_import_names(call: ast.Call, module: str, modules: Mapping[str, object]) -> list[str]:
    """The names an ``importlib.import_module(...)`` / ``__import__(...)`` call can import."""
    func = call.func
    fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(
        func, ast.Attribute) else None
    if fname not in ("import_module", "__import__") or not call.args:
        return []
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr):
        # the literal prefix, with {__name__} read as this module's name: f"{__name__}.{fmt}"
        prefix = ""
        for value in arg.values:
            if isinstance(value, ast.Constant):
                prefix += str(value.value)
            elif (isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name)
                  and value.value.id == "__name__"):
                prefix += module
            else:
                break
        if "." in prefix:
            # whatever module directly below the prefix's package the call may import
            package, _, start = prefix.rpartition(".")
            return [m for m in modules
                    if m.rpartition(".")[0] == package and m.rpartition(".")[2].startswith(start)]
    return []


def imports_of(path: Path, module: str, is_package: bool,
               modules: Mapping[str, object]) -> dict[str, list[int]]:
    """The modules of ours that ``path`` imports anywhere in its text: target -> line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # the package that relative imports start from
    here = module.split(".") if is_package else module.split(".")[:-1]
    found: dict[str, list[int]] = {}

    def add(name: str | None, line: int) -> None:
        target = _resolve(name, modules) if name else None
        if target is not None and target != module:
            lines = found.setdefault(target, [])
            if line not in lines:  # one per statement, not one per imported name
                lines.append(line)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            # TYPE_CHECKING blocks never run: no import in them can take part in a cycle
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            for alias in node.names:
                sub = f"{stem}.{alias.name}"
                add(sub if alias.name != "*" and sub in modules else stem, node.lineno)
        elif isinstance(node, ast.Call):
            for name in _dynamic_import_names(node, module, modules):
                add(name, node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(repo: Path = REPO, roots: Iterable[str] = ROOT_PACKAGES) -> Graph:
    """Module -> the modules of ours it imports, each with the places (``file:line``) it does."""
    modules = discover_modules(repo, roots)
    graph: Graph = {}
    for module, (path, is_package) in modules.items():
        rel = path.relative_to(repo).as_posix()
        graph[module] = {target: [f"{rel}:{line}" for line in lines]
                         for target, lines in imports_of(path, module, is_package, modules).items()}
    return graph


def package_of(module: str, packages: set[str]) -> str:
    """The package node of a module: a package is itself, a module directly in a top-level package
    is its own node, any other module is the package (directory) it lies in."""
    if module in packages:
        return module
    parent = module.rpartition(".")[0]
    return module if "." not in parent else parent


def package_graph(graph: Graph, packages: set[str]) -> Graph:
    """The import graph with every module collapsed to its package; a package's edges to itself are
    dropped."""
    collapsed: Graph = {}
    for module, targets in graph.items():
        source = package_of(module, packages)
        edges = collapsed.setdefault(source, {})
        for target, places in targets.items():
            dest = package_of(target, packages)
            if dest != source:
                edges.setdefault(dest, []).extend(places)
    for edges in collapsed.values():
        for dest, places in edges.items():
            edges[dest] = sorted(set(places), key=lambda p: (p.rpartition(":")[0],
                                                              int(p.rpartition(":")[2])))
    return collapsed


# --------------------------------------------------------------------------------------------------
# cycles


def strongly_connected_components(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); every node, targets included."""
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    succ = {n: sorted(graph.get(n, ())) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for j in range(i, len(succ[node])):
                nxt = succ[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
            if work:  # back in the caller: fold the callee's low link into it
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def _shortest_cycle_through(node: str, graph: Mapping[str, Iterable[str]],
                            within: set[str]) -> list[str]:
    """The shortest path node -> ... -> node that stays inside ``within`` (breadth first)."""
    previous: dict[str, str] = {}
    queue = deque([node])
    seen = {node}
    while queue:
        current = queue.popleft()
        for nxt in sorted(graph.get(current, ())):
            if nxt not in within:
                continue
            if nxt == node:
                path = [current]
                while path[-1] != node:
                    path.append(previous[path[-1]])
                return [*reversed(path), node]
            if nxt not in seen:
                seen.add(nxt)
                previous[nxt] = current
                queue.append(nxt)
    raise AssertionError(f"{node} is on no cycle inside {sorted(within)}")


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every import cycle, as chains ``[a, b, ..., a]``: for each strongly connected component of
    more than one node, the shortest cycle through each of its nodes (each chain once, starting at
    its smallest node). Empty when the graph has no cycle."""
    cycles: list[list[str]] = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue  # self-edges are not recorded, so a lone node is on no cycle
        within = set(component)
        seen: set[tuple[str, ...]] = set()
        for node in component:
            chain = _shortest_cycle_through(node, graph, within)[:-1]
            k = chain.index(min(chain))
            canonical = tuple(chain[k:] + chain[:k])
            if canonical not in seen:
                seen.add(canonical)
                cycles.append([*canonical, canonical[0]])
    return sorted(cycles)


def describe(cycles: list[list[str]], graph: Graph, what: str) -> str:
    """The cycles as readable chains, each followed by the import statements of its edges."""
    lines = [f"{len(cycles)} import cycle(s) between {what}:"]
    for chain in cycles:
        lines.append("  " + " -> ".join(chain))
        for a, b in zip(chain, chain[1:], strict=False):
            lines.append(f"      {a} -> {b}: {', '.join(graph[a][b])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the tests


def test_cycle_finder_on_hand_made_graphs() -> None:
    """The finder reports a known cycle (and only the nodes on it), and nothing on a DAG."""
    with_cycle = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert find_cycles(with_cycle) == [["a", "b", "c", "a"]]
    # two cycles sharing a node: both are reported
    two = {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}
    assert find_cycles(two) == [["a", "b", "a"], ["a", "c", "a"]]
    # a diamond and a chain: no cycle, even though "d" is reached twice
    dag = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set(), "e": {"a", "d"}}
    assert find_cycles(dag) == []
    assert sorted(map(len, strongly_connected_components(dag))) == [1, 1, 1, 1, 1]
    # a long chain closed at its end (the iterative Tarjan needs no recursion)
    long = {f"n{i:04d}": {f"n{i + 1:04d}"} for i in range(3000)}
    assert max(map(len, strongly_connected_components(long))) == 1
    long["n3000"] = {"n0000"}
    assert [len(c) for c in strongly_connected_components(long)] == [3001]


def test_graph_sees_imports_in_functions_relative_and_dynamic(tmp_path: Path) -> None:
    """The graph builder on a hand-made package: deferred, relative and dynamic imports are edges,
    TYPE_CHECKING ones are not, and a module and package cycle are reported."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "plug").mkdir()
    (pkg / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.sub import c\n"
        "else:\n"
        "    import pkg.errors\n"
        "def f():\n"
        "    from pkg.sub import b\n"
        "    return b\n")
    (pkg / "errors.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text(
        "thing = 1\n"
        "class K:\n"
        "    def m(self):\n"
        "        from ..a import f\n"
        "        from .. import __version__\n"
        "        return f, __version__\n")
    (pkg / "sub" / "c.py").write_text("from pkg.a import f\n")
    (pkg / "plug" / "__init__.py").write_text(
        "import importlib\n"
        "def load(name):\n"
        "    return importlib.import_module(f'{__name__}.{name}')\n")
    (pkg / "plug" / "x.py").write_text("from pkg.plug import load\n")

    graph = import_graph(tmp_path, ["pkg"])
    assert {m: set(t) for m, t in graph.items()} == {
        "pkg": set(),
        "pkg.a": {"pkg.errors", "pkg.sub.b"},  # not pkg.sub.c: TYPE_CHECKING
        "pkg.errors": set(),
        "pkg.sub": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.a", "pkg"},
        "pkg.sub.c": {"pkg.a"},
        "pkg.plug": {"pkg.plug.x"},
        "pkg.plug.x": {"pkg.plug"},
    }
    assert graph["pkg.a"]["pkg.sub.b"] == ["pkg/a.py:7"]
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.plug", "pkg.plug.x", "pkg.plug"]]

    packages = {"pkg", "pkg.sub", "pkg.plug"}
    assert package_of("pkg.errors", packages) == "pkg.errors"
    assert package_of("pkg.sub.b", packages) == "pkg.sub"
    assert package_of("pkg.sub", packages) == "pkg.sub"
    collapsed = package_graph(graph, packages)
    assert {m: set(t) for m, t in collapsed.items()} == {
        "pkg": set(), "pkg.a": {"pkg.errors", "pkg.sub"}, "pkg.errors": set(),
        "pkg.sub": {"pkg.a", "pkg"}, "pkg.plug": set()}
    assert find_cycles(collapsed) == [["pkg.a", "pkg.sub", "pkg.a"]]
    message = describe(find_cycles(collapsed), collapsed, "packages")
    assert "pkg.a -> pkg.sub -> pkg.a" in message and "pkg/sub/b.py:4" in message


@pytest.fixture(scope="module")
def graph() -> Graph:
    built = import_graph()
    # a walker that found nothing would pass vacuously
    assert "recsys" in built and len(built) > 20
    assert sum(map(len, built.values())) > len(built)
    return built


def test_no_import_cycles_between_modules(graph: Graph) -> None:
    cycles = find_cycles(graph)
    assert not cycles, describe(cycles, graph, "modules")


def test_no_import_cycles_between_packages(graph: Graph) -> None:
    packages = {m for m, (_, is_package) in discover_modules(REPO, ROOT_PACKAGES).items()
                if is_package}
    collapsed = package_graph(graph, packages)
    cycles = find_cycles(collapsed)
    assert not cycles, describe(cycles, collapsed, "packages")
