"""The layout of SPEC §4: no import cycles, and each package imports only what its docstring allows.

The import graph is read from the source (``ast``), function-level imports
included, so a cycle hidden behind a late import counts too.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("locoprop", "baselines", "sweeps", "analysis")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (a package import counts as its __init__)."""
    modules = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from sweeps.runner import run_directory` imports the module sweeps.runner.run_directory
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            found |= {target for target in targets if target in modules and target != name}
        graph[name] = found
    return graph


GRAPH = _imports()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_the_reader_sees_every_project_module():
    assert {"locoprop.optimizer", "sweeps.runner.train", "sweeps.search.optuna_backend", "sweeps.commands.cli"} <= set(
        GRAPH
    )
    assert "sweeps.runner.train" in GRAPH["sweeps.search.optuna_backend"]  # a trial is a run


def test_no_import_cycles():
    # A package's __init__ that re-exports its modules is not a cycle with them.
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in GRAPH.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# module prefix -> project module prefixes it must not import
FORBIDDEN = {
    "locoprop": ("baselines", "sweeps", "analysis"),
    "baselines": ("sweeps", "analysis"),
    "sweeps.schema": ("locoprop", "baselines", "sweeps.runner", "sweeps.search", "sweeps.commands", "analysis"),
    "sweeps.extras": ("locoprop", "baselines", "sweeps.runner", "sweeps.search", "sweeps.commands", "analysis"),
    "sweeps.runner": ("sweeps.search", "sweeps.commands", "analysis"),
    "sweeps.search": ("sweeps.commands", "analysis"),
    "analysis": ("locoprop", "baselines", "sweeps.runner", "sweeps.search", "sweeps.commands"),
}


@pytest.mark.parametrize("prefix", FORBIDDEN)
def test_each_package_imports_only_what_it_may(prefix):
    wrong = [
        (module, target)
        for module, targets in GRAPH.items()
        if module == prefix or module.startswith(prefix + ".")
        for target in targets
        if any(target == bad or target.startswith(bad + ".") for bad in FORBIDDEN[prefix])
    ]
    assert not wrong, wrong


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
