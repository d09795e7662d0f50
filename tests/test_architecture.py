"""The package's shape: no import cycles, no upward imports, no module over 450 lines.

Every module under platform/lmforge is parsed with `ast` (nothing is imported), and every
`import lmforge...` / `from lmforge... import ...` in it counts, at module level or inside a
function: a lazy import still ties the two modules together. The layer table below is the one
docs/architecture.md shows; a test keeps the two the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "platform" / "lmforge"
MAX_LINES = 450

# Layers, lowest first. A module belongs to the layer of the longest prefix that names it
# (`lmforge` alone is the package's __init__); every `<package>.command` module is in "entry"
# whatever its package. A module may import
# its own layer and the layers below it, never one above.
LAYERS: dict[str, list[str]] = {
    "core": [
        "lmforge",
        "lmforge.console",
        "lmforge.storage",
        "lmforge.config",
        "lmforge.plots",
        "lmforge.tracking",
    ],
    "runtime": ["lmforge.stage", "lmforge.cluster.local"],
    "domain": [
        "lmforge.builtin",
        "lmforge.model",
        "lmforge.data",
        "lmforge.train",
        "lmforge.eval",
        "lmforge.finetune",
        "lmforge.serve",
        "lmforge.monitor",
        "lmforge.improve",
        "lmforge.check",
    ],
    "entry": ["lmforge.cli", "lmforge.cluster", "lmforge.project", "lmforge.comparison"],
}

# Inside the domain layer a package imports its own modules and only these other packages.
DOMAIN_IMPORTS: dict[str, list[str]] = {
    "builtin": ["model"],  # the chat format of the built-in QA items
    "model": ["data"],  # special tokens are read from the data stage's tokenizer
    "data": ["builtin"],
    "train": ["model", "data", "eval"],  # eval in the loop (eval.stage.evaluate_in_process)
    "eval": ["model", "data", "builtin"],
    "finetune": ["train", "model", "data", "builtin"],
    "serve": ["model", "data"],  # the request log scrubs PII with the data steps
    "monitor": ["serve"],  # reads the request log the serving app writes
    "improve": ["finetune", "eval", "train", "serve", "monitor", "model", "data"],
    "check": [],
}

# Edges that break the layering today, each to be removed by the change named with it. The
# checks ignore exactly these module -> module imports (cycles too); remove a line when its
# change lands, and never add one for new code.
TEMPORARY_ALLOWANCES: dict[tuple[str, str], str] = {}

# Modules over MAX_LINES today, each to be split by the change named with it.
TEMPORARY_LONG_MODULES: dict[str, str] = {}


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The lmforge modules `path` imports: `from a.b import c` is a.b.c when that is a
    module, else a.b (a name defined there)."""

    def known(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {known(a.name) for a in node.names if a.name.split(".")[0] == "lmforge"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "lmforge":
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else known(node.module))
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import; write `from lmforge.... import`")
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        edges = imported_modules(path, modules) - {name}
        graph[name] = {e for e in edges if (name, e) not in TEMPORARY_ALLOWANCES}
    return graph


def layer_of(module: str) -> str:
    if module.endswith(".command"):
        return "entry"
    best, layer = "", ""
    for name, prefixes in LAYERS.items():
        for prefix in prefixes:
            # `lmforge` names the package's __init__ alone: a new root module picks its layer
            inside = module.startswith(prefix + ".") and prefix != "lmforge"
            if (module == prefix or inside) and len(prefix) > len(best):
                best, layer = prefix, name
    assert layer, f"{module} is in no layer: add its package to LAYERS in {__file__}"
    return layer


def domain_package(module: str) -> str:
    return module.split(".")[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    order = list(LAYERS)
    problems = []
    for module, edges in sorted(graph.items()):
        here = layer_of(module)
        for target in sorted(edges):
            there = layer_of(target)
            if order.index(there) > order.index(here):
                problems.append(f"{module} ({here}) imports {target} ({there})")
            elif here == there == "domain":
                src, dst = domain_package(module), domain_package(target)
                if src != dst and dst not in DOMAIN_IMPORTS[src]:
                    problems.append(
                        f"{module} imports {target}: {src} may import only "
                        f"{', '.join(DOMAIN_IMPORTS[src]) or 'no other domain package'}"
                    )
    return problems


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (a -> b -> ... -> a), or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def layer_tables_markdown() -> list[str]:
    """The two tables docs/architecture.md shows, rendered from LAYERS and DOMAIN_IMPORTS."""
    layers = ["| layer | modules |", "|---|---|"]
    for name, prefixes in LAYERS.items():
        extra = ", every `<package>.command`" if name == "entry" else ""
        layers.append(f"| {name} | {', '.join(f'`{p}`' for p in prefixes)}{extra} |")
    domain = ["| domain package | may import |", "|---|---|"]
    for src, dsts in DOMAIN_IMPORTS.items():
        domain.append(f"| `{src}` | {', '.join(f'`{d}`' for d in dsts) or '(none)'} |")
    return ["\n".join(layers) + "\n", "\n".join(domain) + "\n"]


def test_a_new_root_module_must_be_given_a_layer():
    assert layer_of("lmforge") == "core" and layer_of("lmforge.stage") == "runtime"
    assert layer_of("lmforge.cluster.local") == "runtime"
    assert layer_of("lmforge.cluster.submit") == layer_of("lmforge.data.command") == "entry"
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("lmforge.helpers")


def test_every_module_is_in_a_layer_and_every_domain_package_in_the_table():
    for module in module_files():
        if layer_of(module) == "domain":
            assert domain_package(module) in DOMAIN_IMPORTS, module


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_upward_imports():
    problems = upward_imports(import_graph())
    assert not problems, "imports against the layers (docs/architecture.md):\n" + "\n".join(
        problems
    )


def test_no_module_over_450_lines():
    long = {
        name: n
        for name, path in module_files().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
        and name not in TEMPORARY_LONG_MODULES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_temporary_allowances_are_still_needed():
    """An allowance whose edge or long module is gone must leave the table with it."""
    modules = module_files()
    for (src, dst), why in TEMPORARY_ALLOWANCES.items():
        assert src in modules and dst in imported_modules(modules[src], modules), (
            f"{src} -> {dst} no longer exists: remove its allowance ({why})"
        )
    for name in TEMPORARY_LONG_MODULES:
        assert name in modules and len(modules[name].read_text().splitlines()) > MAX_LINES, (
            f"{name} is {MAX_LINES} lines or less now: remove it from TEMPORARY_LONG_MODULES"
        )


def test_the_docs_show_the_same_layer_table():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for table in layer_tables_markdown():
        assert f"\n\n{table}\n" in doc, (
            "docs/architecture.md's layer tables differ from tests/test_architecture.py; "
            f"paste this one:\n{table}"
        )


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"a2"}, "a2": {"b"}, "b": {"a2"}}, ["a2", "b", "a2"]),
    ],
)
def test_find_cycle_reports_the_cycle_path(graph, expected):
    assert find_cycle(graph) == expected


def test_upward_and_unlisted_imports_are_reported():
    graph = {
        "lmforge.storage": {"lmforge.stage"},  # core -> runtime
        "lmforge.data.stage": {"lmforge.eval.tasks"},  # data may not import eval
        "lmforge.eval.stage": {"lmforge.data.tokenizer", "lmforge.stage"},  # allowed
        "lmforge.cli": {"lmforge.project.command"},  # entry -> entry
    }
    assert upward_imports(graph) == [
        "lmforge.data.stage imports lmforge.eval.tasks: data may import only builtin",
        "lmforge.storage (core) imports lmforge.stage (runtime)",
    ]
