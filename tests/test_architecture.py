"""The package's import structure, read from the source: no import circles, layers that
point one way, and the broker on the OpenTelemetry API only.

Every import counts, including those under ``if TYPE_CHECKING:`` and inside functions:
a circle that only type checking sees still ties the modules together for a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streambus"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every module name ``module`` imports (resolved: ``from pkg import mod`` names mod)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                yield candidate if candidate in known else source


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: {dep for dep in _imported(name, path, known) if dep in known and dep != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_known_imports() -> None:
    """The graph is read right: edges that exist are found, TYPE_CHECKING ones included."""
    graph = import_graph()
    assert "streambus.app" in graph["streambus.broker"]
    assert "streambus.cluster_metadata" in graph["streambus.broker"]
    assert "streambus.server" in graph["streambus.app"]
    assert "streambus.protocol.produce" in graph["streambus.app"]  # from pkg import module
    assert "streambus.partitions" in graph["streambus.groups.offsets"]
    assert "streambus.protocol.context" in graph["streambus.protocol.fetch"]  # TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_in_the_package() -> None:
    assert cycles(import_graph()) == []


def test_layers_point_down() -> None:
    """Handlers and the server know the BrokerServices Protocol, not the broker; partition
    data is reached through the partition service, never storage; records know no layer.
    The cluster metadata sits under the broker, which alone wires it: handlers see it only
    through the Protocol, and it knows neither handlers nor server."""
    graph = import_graph()
    below_broker = [m for m in graph if m.startswith("streambus.protocol")]
    below_broker += ["streambus.server", "streambus.app", "streambus.partitions"]
    below_broker += ["streambus.cluster_metadata"]
    for module in below_broker:
        assert "streambus.broker" not in graph[module], module
    users = {m for m, deps in graph.items() if "streambus.cluster_metadata" in deps}
    assert users == {"streambus.broker"}, users
    assert not any(
        dep.startswith(("streambus.protocol", "streambus.server", "streambus.app"))
        for dep in graph["streambus.cluster_metadata"]
    ), graph["streambus.cluster_metadata"]
    for module in (m for m in graph if m.startswith(("streambus.protocol", "streambus.groups"))):
        assert not any(dep.startswith("streambus.storage") for dep in graph[module]), module
    for module in (m for m in graph if m.startswith("streambus.records")):
        reaches = {d for d in graph[module] if not d.startswith("streambus.records")}
        assert reaches <= {"streambus.errors"}, (module, reaches)


def test_the_broker_uses_the_opentelemetry_api_only() -> None:
    """The SDK belongs to the pipeline (``telemetry/``), which the operator chooses."""
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [(name, n) for n in names if n.startswith("opentelemetry.sdk")]
    assert offenders == []
