"""The house stays readable: no import circle among greupd's modules, and the daemon stays the wiring only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "greupd"
DAEMON_MAX_LINES = 250


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """greupd module -> the greupd modules it imports (lazy imports inside functions included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        # A package's __init__ is not an edge to its own modules' importers (`from greupd.netlink import rtnl`).
        graph[name] = {m for m in found if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_greupd_imports_have_no_circle() -> None:
    graph = _imports()
    assert "greupd.daemon" in graph and "greupd.netlink.kernel" in graph
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_daemon_is_wiring_only() -> None:
    lines = len((PACKAGE / "daemon.py").read_text(encoding="utf-8").splitlines())
    assert lines < DAEMON_MAX_LINES, f"greupd/daemon.py has {lines} lines; keep it the wiring (< {DAEMON_MAX_LINES})"


CONFIG_MAX_LINES = 400


def test_the_config_loader_is_a_module_of_its_own_apart_from_the_models_and_the_line_locator() -> None:
    # Issue #21 build item 4: config.py had grown to 1,168 lines holding files, parsing, models and the locator.
    config = PACKAGE / "config"
    assert (config / "loader.py").is_file(), "the loader (files, tunnels.d, limits) is greupd/config/loader.py"
    graph = _imports()
    # The models and the line locator know nothing of files: the loader uses them, never the other way round.
    for module in ("greupd.config.models", "greupd.config.fields", "greupd.config.lines", "greupd.config.validate"):
        assert "greupd.config.loader" not in graph[module], f"{module} imports the loader"
    assert "greupd.config.models" not in graph["greupd.config.lines"]
    for path in sorted(config.glob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines < CONFIG_MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (< {CONFIG_MAX_LINES})"
