"""The import map of ``kasched/``: derived from the source (every ``import`` statement, at module level
or inside a function), it has no circle between modules and no arrow from a lower layer to a higher
one. The layers are written here as data, lowest first; docs/architecture.md ("Import map") lists them."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "kasched"

# Lowest first. A module may import its own layer and the layers below. The first pattern a module
# matches gives its layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("kasched", "kasched.errors", "kasched.text", "kasched.nodeset", "kasched.config",
              "kasched.deadline", "kasched.identity", "kasched.rates", "kasched.yamlfile", "kasched.safeopen",
              "kasched.files", "kasched.processes", "kasched.urlfetch")),
    ("data", ("kasched.models", "kasched.db", "kasched.migrations", "kasched.migrations.*", "kasched.views",
              "kasched.messages", "kasched.results", "kasched.sqlsets")),
    ("transports", ("kasched.transports", "kasched.transports.*")),
    ("core", ("kasched.grants", "kasched.inventory", "kasched.environments", "kasched.imagestore",
              "kasched.stats", "kasched.hookspecs", "kasched.bus", "kasched.schedulers", "kasched.bootkeys",
              "kasched.partition_digest", "kasched.imagesecrets", "kasched.drivers",
              "kasched.drivers.*", "kasched.builtin", "kasched.builtin.*", "kasched.api")),
    ("deploy", ("kasched.deploy", "kasched.deploy.*", "kasched.partition_verify", "kasched.powercheck",
                "kasched.reconcile", "kasched.simulated", "kasched.simulated.calibration",
                "kasched.simulated.commands", "kasched.simulated.drivers", "kasched.simulated.node", "kasched.simulated.persist",
                "kasched.simulated.plugin", "kasched.simulated.site")),
    ("front", ("kasched.front", "kasched.local", "kasched.compose", "kasched.doctor", "kasched.service",
               "kasched.service.remote",
               "kasched.service.follow", "kasched.service.access", "kasched.service.client",
               "kasched.service.auth")),
    ("service", ("kasched.service.*",)),
    ("lab", ("kasched.lab", "kasched.lab.*", "kasched.simulated.builder")),
    ("cli", ("kasched.cli", "kasched.cli.*", "kasched.__main__")),
]  # fmt: skip

# Imports that run up a layer on purpose, each with why. Empty: none.
DECLARED_UPWARD: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports (anywhere in its code)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*package, *([node.module] if node.module else [])])
                candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name and not (candidate == "kasched" and name != "kasched"):
                    targets.add(candidate)
        graph[name] = targets
    return graph


def layer_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        layer_of(module)


def test_no_import_runs_up_a_layer() -> None:
    graph = import_graph()
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module) and (module, target) not in DECLARED_UPWARD
    ]
    assert upward == []


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_the_checks_see_a_circle_and_an_upward_import() -> None:
    """The checks themselves: a made-up circle is found, and the real graph has arrows to check."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "kasched.api" in graph["kasched.compose"] and "kasched.front" in graph["kasched.local"]
    assert layer_of("kasched.cli.deploy") > layer_of("kasched.front") > layer_of("kasched.deploy.operations")
