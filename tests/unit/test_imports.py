"""The project's import graph, read from the source with `ast` (nothing is imported): no module imports itself
back through others, and the trainer does not depend on the planner.

Every `import` and `from ... import` counts, at module level or inside a function (a function-level import still
runs, only later), except those under `if TYPE_CHECKING:`, which never execute. `import a.b.c` and
`from a.b import c` count as importing module a.b.c when it is one, else `from a.b import c` counts as a.b (a
package's import counts as its __init__). Only imports between modules of the project's packages are kept.
"""

import ast
from collections import deque
from collections.abc import Callable
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("moe_model", "moe_recipe")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES (a package by its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class ImportCollector(ast.NodeVisitor):
    """The modules one module's import statements name: (module, the names a from-import takes from it)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, list[str]]] = []

    def visit_If(self, node: ast.If) -> None:
        if not is_type_checking(node.test):
            for child in node.body:
                self.visit(child)
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.extend((alias.name, []) for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module
        self.found.append((module, [alias.name for alias in node.names]))


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import of `name` runs: the longest prefix of it that is a module, if any."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a module's imports of itself left out)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        collector = ImportCollector(module, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        targets = set()
        for imported, names in collector.found:
            targets.update(resolve(f"{imported}.{name}", modules) for name in names)
            if not names:
                targets.add(resolve(imported, modules))
        graph[module] = targets - {None, module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        path, node = [min(component)], min(component)
        while True:  # every member of the component has an edge to another member: the walk must close
            node = min(graph[node] & component)
            if node in path:
                cycles.append(path[path.index(node):] + [node])
                break
            path.append(node)
    return sorted(cycles)


def import_chain(graph: dict[str, set[str]], start: str, reached: Callable[[str], bool]) -> list[str] | None:
    """The shortest chain of imports from `start` to a module for which `reached` holds, or None."""
    parents = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if reached(node) and node != start:
            chain = [node]
            while parents[chain[-1]] is not None:
                chain.append(parents[chain[-1]])
            return chain[::-1]
        for target in sorted(graph.get(node, ())):
            if target not in parents:
                parents[target] = node
                queue.append(target)
    return None


def is_planner(module: str) -> bool:
    return module == "moe_recipe.plan" or module.startswith("moe_recipe.plan.")


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (break each by moving what both sides need into a module of its own): " + \
        "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_trainer_does_not_import_the_planner():
    chain = import_chain(import_graph(), "moe_recipe.trainer", is_planner)
    assert chain is None, "moe_recipe.trainer imports the planner: " + " -> ".join(chain) + \
        " (what both need belongs in a module outside moe_recipe/plan/)"


def test_the_cycle_finder_names_each_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"g"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert import_chain(graph, "a", lambda m: m == "d") == ["a", "b", "c", "d"]
    assert import_chain(graph, "d", lambda m: m == "a") is None


def test_the_graph_reads_every_kind_of_import():
    graph = import_graph()
    assert "moe_recipe.flops" in graph["moe_recipe.callbacks"]  # from .flops import ...
    assert "moe_recipe.plan.hardware" in graph["moe_recipe.plan.build"]  # from .hardware import ...
    assert "moe_recipe.files" in graph["moe_recipe.data.store"]  # from ..files import ...
    assert "moe_recipe.config" in graph["moe_recipe.plan.build"]  # inside a function
    assert "moe_model" in graph["moe_recipe.engine"]  # a package: its __init__
    assert "moe_model.moe_blocks" in graph["moe_recipe.engine"]
    assert "moe_recipe.trainer" not in graph["moe_recipe.callbacks"]  # only under TYPE_CHECKING
