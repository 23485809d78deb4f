"""The layers of each package, checked on the source: no import runs back up a layer,
no package reaches into a process it only talks to over the wire, no module cycle.

Imports are read from the syntax tree (function-level ones too), those under
`if TYPE_CHECKING:` included: a type a lower layer names from a higher one is a circle
even when it never runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {  # top-level package -> its directory
    "autoglm_settings": ROOT / "autoglm_settings",
    "autoglm_common": ROOT / "autoglm_common",
    "autoglm_client": ROOT / "clients" / "python" / "autoglm_client",
    "gateway": ROOT / "gateway",
    "memory_daemon": ROOT / "memory_daemon",
    "inference_svc": ROOT / "inference_svc",
}
# What each package may import of the project's own (the generated `autoglm` protos are
# open to all). The gateway and the daemon talk to the service over gRPC only.
ALLOWED_PACKAGES = {
    "autoglm_settings": set(),
    "autoglm_common": set(),
    "autoglm_client": set(),
    "gateway": {"autoglm_client", "autoglm_common", "autoglm_settings"},
    "memory_daemon": {"autoglm_client", "autoglm_settings"},
    # the service imports nothing of the client's: what they share is autoglm_common's
    "inference_svc": {"autoglm_common", "autoglm_settings"},
}
# The service's layers, lowest first: a module imports from its own layer or below.
SERVICE_LAYERS = [
    {"errors", "types", "ids", "process_memory", "watchdog"},
    {"model"},
    {"engine"},
    {"memory"},
    {"config", "loading", "service_state", "metrics"},
    {"control", "transport"},
    {"server"},
    {"cli", "__main__"},
]
PROJECT = set(SOURCES) | {"autoglm"}


def modules() -> Iterator[tuple[str, Path]]:
    for package, directory in SOURCES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def imports_of(path: Path, module: str) -> set[str]:
    """The project modules `path` imports (absolute names; relative ones resolved)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name.split(".")[0] in PROJECT}


GRAPH = {module: imports_of(path, module) for module, path in modules()}
KNOWN = set(GRAPH)


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    for index, layer in enumerate(SERVICE_LAYERS):
        if part in layer:
            return index
    raise AssertionError(f"{module} is in no layer: add it to SERVICE_LAYERS")


def _resolve(name: str) -> str | None:
    """The module an imported name lives in (a name may be a module or a member)."""
    while name and name not in KNOWN:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_packages_import_only_what_they_may(module):
    package = module.split(".")[0]
    foreign = {name for name in GRAPH[module]
               if name.split(".")[0] not in {package, "autoglm", *ALLOWED_PACKAGES[package]}}
    assert not foreign, f"{module} imports {sorted(foreign)}"


def upward(module: str, imports: set[str]) -> list[str]:
    """The service modules `module` imports from a layer above its own."""
    own = _layer(module)
    return sorted(target for target in filter(None, map(_resolve, imports))
                  if target.startswith("inference_svc.") and _layer(target) > own)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Module-level import cycles (a package importing its own submodules is none)."""
    edges = {m: {t for t in map(_resolve, graph[m]) if t and t != m
                 and not m.startswith(f"{t}.")} for m in graph}
    visiting: list[str] = []
    done: set[str] = set()
    found: list[list[str]] = []

    def walk(module: str) -> None:
        visiting.append(module)
        for target in sorted(edges[module]):
            if target in visiting:
                found.append([*visiting[visiting.index(target):], target])
            elif target not in done:
                walk(target)
        visiting.pop()
        done.add(module)

    for module in sorted(edges):
        if module not in done:
            walk(module)
    return found


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("inference_svc.")))
def test_no_service_import_runs_back_up_a_layer(module):
    assert not upward(module, GRAPH[module]), (
        f"{module} (layer {_layer(module)}) imports a higher layer: "
        f"{upward(module, GRAPH[module])}")


def test_no_module_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_checks_catch_a_back_edge_and_a_cycle():
    """The checker itself, on edges the tree does not have."""
    assert upward("inference_svc.engine.model_loop", {"inference_svc.server.Service"}) == [
        "inference_svc.server"]
    assert upward("inference_svc.server", {"inference_svc.engine.engine.Engine"}) == []
    graph = {**GRAPH, "inference_svc.model.base": GRAPH["inference_svc.model.base"] | {
        "inference_svc.model.modular"}}
    assert any("inference_svc.model.base" in cycle for cycle in cycles(graph))
