"""The package's import graph, read from the source (every import counts: at module level, inside functions, and
under ``TYPE_CHECKING``): the rollout engines and the setups never reach the module, and the reward package's
imports run one way."""

from __future__ import annotations

import ast
from pathlib import Path

import relax_pl

PACKAGE = Path(relax_pl.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The relax_pl modules ``path`` imports (``from relax_pl.x import y`` counts ``relax_pl.x``, and ``relax_pl.x.y``
    where that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in GRAPH_NODES}


GRAPH_NODES = {module_name(path) for path in PACKAGE.rglob("*.py")}
GRAPH = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for name in GRAPH[todo.pop()] - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_the_graph_is_read():
    """The reader finds the imports it is asked about (a broken reader would pass the tests below)."""
    assert "relax_pl.module" in GRAPH["relax_pl.cli"]
    assert {"relax_pl.rollout", "relax_pl.setups"} <= GRAPH["relax_pl.module"]
    assert "relax_pl.rollout.base" in reachable("relax_pl.module")


def test_no_engine_or_setup_imports_the_module():
    engines_and_setups = [name for name in GRAPH if name.startswith("relax_pl.rollout")] + ["relax_pl.setups"]
    assert len(engines_and_setups) > 5
    for name in engines_and_setups:
        assert "relax_pl.module" not in GRAPH[name], f"{name} imports relax_pl.module"
        assert "relax_pl.module" not in reachable(name), f"{name} reaches relax_pl.module through its imports"


def test_reward_package_imports_run_one_way():
    rewards = {name for name in GRAPH if name.startswith("relax_pl.rewards.")}
    assert {"relax_pl.rewards.base", "relax_pl.rewards.direct", "relax_pl.rewards.bounded"} <= rewards
    for name in rewards:
        assert name not in reachable(name), f"{name} imports itself back through {sorted(GRAPH[name] & rewards)}"
