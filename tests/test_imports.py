"""The package's import graph: no circle, no arrow running up a floor, no library module
importing a command-line module.

Every ``import`` of a craterlab module counts, at a module's top or inside a function (a
deferred import is still an arrow); only ``if TYPE_CHECKING:`` blocks, which never run,
don't. Each module's floor comes from :data:`FLOORS` (the longest matching prefix); a module
may import modules on its own floor or below, never above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "craterlab"

# Floors, bottom to top (docs/development.md, "Import floors": results, types and errors at the
# bottom, components above, pipeline and tracking above them, sweeps / report / workflows on top).
FLOORS: dict[str, int] = {
    "craterlab.errors": 0,
    "craterlab.hashing": 0,
    "craterlab.results": 0,
    "craterlab.types": 0,
    "craterlab.kinds": 0,
    "craterlab.hookspecs": 0,
    "craterlab.lazy": 0,
    "craterlab.locks": 0,
    "craterlab.registry": 1,
    "craterlab.devices": 1,
    "craterlab.plugins": 1,
    "craterlab.data": 2,
    "craterlab.geo": 2,
    "craterlab.backbones": 2,
    "craterlab.tokens": 2,
    "craterlab.retrieval": 2,
    "craterlab.metrics": 2,
    "craterlab.cache": 2,
    "craterlab.checks": 2,
    "craterlab.train": 2,
    "craterlab.train.pretrain": 5,  # reads unlabeled crops as the workflows do (their items)
    "craterlab.train.ssl_pairs": 5,  # reads a manifest's map positions as the workflows do
    "craterlab.pipeline": 3,
    "craterlab.tracking": 3,
    "craterlab.report": 4,
    "craterlab.sweeps": 4,
    "craterlab.experiment": 5,
    "craterlab.workflows": 5,
    "craterlab.commands": 5,
    "craterlab.testing": 5,
    "craterlab.scaffold": 5,
    "craterlab.__main__": 5,
    # The package itself is a facade that imports what it serves on first use (importlib, not
    # an import statement): reading ``craterlab.__version__`` from it is no arrow up.
    "craterlab": 1,
}
# Command-line modules: only the command line itself may import them.
CLI_MODULES = ("craterlab.__main__", "craterlab.commands")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The craterlab modules ``name`` imports, anywhere in its file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    type_only = {  # "if TYPE_CHECKING:" blocks are read by type checkers, never run
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # "from craterlab import hookspecs" imports a module
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in known else source)
    out = set()
    for target in targets:
        while target not in known and "." in target:
            target = target.rpartition(".")[0]
        if target in known:
            out.add(target)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def floor(module: str) -> int:
    prefix = module
    while prefix not in FLOORS:
        if "." not in prefix:
            raise KeyError(module)
        prefix = prefix.rpartition(".")[0]
    return FLOORS[prefix]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


GRAPH = import_graph()


def test_the_graph_is_read_from_the_code() -> None:
    # an independent check of the parser on imports whose targets are known
    assert "craterlab.results" in GRAPH["craterlab.tracking.mlflow"]
    assert "craterlab.tracking.base" in GRAPH["craterlab.sweeps.callback"]
    assert GRAPH["craterlab.results"] == set()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_floor() -> None:
    missing = []
    for module in GRAPH:
        try:
            floor(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"give these modules a floor in FLOORS: {missing}"


def test_no_import_circle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_runs_up_a_floor(module: str) -> None:
    upward = [m for m in sorted(GRAPH[module]) if floor(m) > floor(module)]
    assert not upward, f"{module} (floor {floor(module)}) imports a higher floor: " + ", ".join(
        f"{m} (floor {floor(m)})" for m in upward
    )


def test_library_modules_never_import_command_line_modules() -> None:
    def is_cli(m: str) -> bool:
        return m == CLI_MODULES[0] or m == CLI_MODULES[1] or m.startswith(CLI_MODULES[1] + ".")

    bad = {
        module: sorted(m for m in targets if is_cli(m))
        for module, targets in GRAPH.items()
        if not is_cli(module) and module != "craterlab"
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"library modules import command-line modules: {bad}"
