"""The import graph of ``app/`` and ``strategies/``, built from the source: no cycles, and
each floor imports only the floors below it (strategies <- core <- jobs/bus <- web).

Every ``import``/``from ... import`` counts, at module level, inside functions and under
``if TYPE_CHECKING:`` alike: a cycle that only type checking closes is still a cycle a
reader has to hold in their head, and the next runtime import closes it for real.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterable, Mapping

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: The top-level packages whose graph is checked.
PACKAGES = ("app", "strategies")

#: Prefix of an importing module -> prefixes it must not import (the floors above it).
FLOOR_RULES: Mapping[str, tuple[str, ...]] = {
    "strategies": ("app",),
    "app.core": ("app.jobs", "app.bus", "app.web", "app.pathtools"),
    "app.jobs": ("app.web",),
    "app.bus": ("app.web",),
}


def module_files(root: pathlib.Path, packages: Iterable[str]) -> dict[str, pathlib.Path]:
    """Every module of ``packages`` under ``root``: dotted name -> file."""
    modules: dict[str, pathlib.Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: pathlib.Path, known: Iterable[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its source."""
    known_set = set(known)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, is_package, node)
            for alias in node.names:
                # ``from pkg import sub`` imports the module ``pkg.sub`` when there is one.
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known_set else target)
    return {name for name in found if name in known_set and name != module}


def import_graph(root: pathlib.Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = module_files(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (or a self-import),
    as a cycle through it: ``[a, b, ..., a]``.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def connect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph: Mapping[str, Iterable[str]], component: list[str]) -> list[str]:
    """One cycle inside a strongly connected ``component``, starting at its first module."""
    members = set(component)
    start = component[0]
    # Breadth-first from start back to start, staying inside the component.
    paths: dict[str, list[str]] = {start: [start]}
    frontier = [start]
    while frontier:
        next_frontier: list[str] = []
        for node in frontier:
            for succ in sorted(graph.get(node, ())):
                if succ == start:
                    return [*paths[node], start]
                if succ in members and succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    next_frontier.append(succ)
        frontier = next_frontier
    return component  # unreachable for a strongly connected component


def floor_violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """``importer -> imported`` for every import that reaches up a floor."""
    found: list[str] = []
    for importer, imported in sorted(graph.items()):
        for prefix, forbidden in FLOOR_RULES.items():
            if not _within(importer, prefix):
                continue
            found.extend(
                f"{importer} -> {target}"
                for target in sorted(imported)
                if any(_within(target, above) for above in forbidden)
            )
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """The import graph of the project's own packages."""
    return import_graph(ROOT, PACKAGES)


class TestProjectGraph:
    """The project as it stands."""

    def test_graph_covers_the_packages(self, graph: dict[str, set[str]]) -> None:
        """The graph holds the modules it should (so an empty graph cannot pass)."""
        assert {"app.web.auth", "app.web.metrics", "app.web.server.limits"} <= set(graph)
        assert {"strategies.base", "app.pathtools.probe.reader"} <= set(graph)
        assert "app.web.keys" in graph["app.web.api"]

    def test_no_import_cycles(self, graph: dict[str, set[str]]) -> None:
        """No module of app/ or strategies/ reaches itself through its imports."""
        cycles = find_cycles(graph)
        assert not cycles, "import cycles (one through each tangle):\n" + "\n".join(
            " -> ".join(cycle) for cycle in cycles
        )

    def test_floors_import_downwards(self, graph: dict[str, set[str]]) -> None:
        """strategies imports no app; core no jobs/bus/web/pathtools; jobs and bus no web."""
        violations = floor_violations(graph)
        assert not violations, "imports up a floor:\n" + "\n".join(violations)


class TestChecker:
    """The checker itself, on small trees written for the purpose."""

    @staticmethod
    def write(root: pathlib.Path, files: Mapping[str, str]) -> None:
        for name, source in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source, encoding="utf-8")

    def test_type_checking_and_function_imports_close_a_cycle(self, tmp_path: pathlib.Path) -> None:
        """A cycle closed by a TYPE_CHECKING import and a function-level one is named."""
        self.write(
            tmp_path,
            {
                "app/__init__.py": "",
                "app/web/__init__.py": "",
                "app/web/keys.py": (
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from app.web.auth import Authenticator\n"
                ),
                "app/web/auth.py": "def f():\n    from app.web import keys\n",
            },
        )
        cycles = find_cycles(import_graph(tmp_path, ["app"]))
        assert cycles == [["app.web.auth", "app.web.keys", "app.web.auth"]]

    def test_relative_imports_resolve(self, tmp_path: pathlib.Path) -> None:
        """``from . import x`` and ``from .x import y`` resolve to the sibling module."""
        self.write(
            tmp_path,
            {
                "app/__init__.py": "",
                "app/probe/__init__.py": "from .reader import read\n",
                "app/probe/reader.py": "from . import analysis\n",
                "app/probe/analysis.py": "from .reader import read\n",
            },
        )
        graph = import_graph(tmp_path, ["app"])
        assert graph["app.probe"] == {"app.probe.reader"}
        assert find_cycles(graph) == [
            ["app.probe.analysis", "app.probe.reader", "app.probe.analysis"]
        ]

    def test_floor_rule_names_the_import(self, tmp_path: pathlib.Path) -> None:
        """An import up a floor is reported as importer -> imported."""
        self.write(
            tmp_path,
            {
                "app/__init__.py": "",
                "app/core/__init__.py": "",
                "app/core/x.py": "import strategies.base\n",
                "strategies/__init__.py": "",
                "strategies/base.py": "from app.core import x\n",
            },
        )
        graph = import_graph(tmp_path, ["app", "strategies"])
        assert floor_violations(graph) == ["strategies.base -> app.core.x"]
