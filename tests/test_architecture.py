"""No module of leanfit imports itself back at run time.

``lint-imports`` (``make test``) checks the layers and, with ``acyclic_siblings``, that packages form no cycle; it
counts imports under ``if TYPE_CHECKING:`` but ignores the two type-only edges of the run contract (the registry
names ``RunContext`` and ``Report``, whose modules import the registry). This test checks every module pair on
the graph that runs: imports inside functions count, type-only ones cannot create an import-order cycle."""

from __future__ import annotations

import grimp
import pytest


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("leanfit", exclude_type_checking_imports=True, cache_dir=None)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph.find_modules_directly_imported_by(module):
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def _describe(graph: grimp.ImportGraph, component: list[str]) -> str:
    """One concrete cycle through the component's first module, with the importing lines."""
    start = component[0]
    imported = next(m for m in sorted(graph.find_modules_directly_imported_by(start)) if m in component)
    chain = [start, *(graph.find_shortest_chain(imported, start) or (imported, start))]
    steps = []
    for a, b in zip(chain, chain[1:], strict=False):
        lines = sorted({d["line_number"] for d in graph.get_import_details(importer=a, imported=b)})
        steps.append(f"  {a} -> {b} (line {', '.join(map(str, lines))})")
    return f"cycle among {component}:\n" + "\n".join(steps)


def test_graph_covers_the_layers(graph):
    for package in ("leanfit.cli", "leanfit.core.runner", "leanfit.noisefit.loss", "leanfit.studies.lm.train"):
        assert package in graph.modules
    assert graph.direct_import_exists(importer="leanfit.core.runner", imported="leanfit.core.registry")


def test_no_import_cycle_among_leanfit_modules(graph):
    cycles = _cycles(graph)
    assert not cycles, "\n\n".join(_describe(graph, c) for c in cycles)


def test_cycle_finder_reports_a_planted_cycle():
    planted = grimp.build_graph("leanfit", exclude_type_checking_imports=True, cache_dir=None)
    planted.add_import(importer="leanfit.core.registry", imported="leanfit.core.runner", line_number=1,
                       line_contents="from leanfit.core import runner")
    cycles = _cycles(planted)
    assert [c for c in cycles if {"leanfit.core.registry", "leanfit.core.runner"} <= set(c)], cycles
    assert "leanfit.core.registry -> leanfit.core.runner (line 1)" in _describe(planted, cycles[0])
