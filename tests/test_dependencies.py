"""Every third-party package lmforge imports is declared in pyproject.toml, and constraints.txt
(the lock file `make setup`, `make test` and the Dockerfile install with) pins each of them.

The rule for where an import must be declared:
- imported when its module is imported (at module level, not under `try: ... except
  ImportError`): in `[project] dependencies`, because `import lmforge.<module>` needs it;
- imported lazily (inside a function) or guarded by `except ImportError`: in `dependencies` or
  in an optional extra (`web`, `hf`), since lmforge runs without it and says which
  extra to install when a feature needs it.
Every third-party import must be declared one way or the other.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

PACKAGE = REPO / "platform" / "lmforge"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CONSTRAINTS = REPO / "constraints.txt"


def third_party_imports(source: str) -> dict[str, bool]:
    """Top-level module name -> True if any import of it runs when the module is imported
    (module level, or a class body, not under `except ImportError` nor in a function)."""
    found: dict[str, bool] = {}

    def visit(node: ast.AST, eager: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            eager = False
        elif isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for child in node.body:
                visit(child, False)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, eager)
            return
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            eager = False  # `if TYPE_CHECKING:` never runs
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("lmforge", "__future__"):
                continue
            found[top] = found.get(top, False) or eager
        for child in ast.iter_child_nodes(node):
            visit(child, eager)

    visit(ast.parse(source), True)
    return found


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types
    )


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def package_imports() -> dict[str, tuple[bool, list[str]]]:
    """Module name -> (imported eagerly anywhere, the files that import it)."""
    result: dict[str, tuple[bool, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, eager in third_party_imports(path.read_text()).items():
            was_eager, files = result.get(name, (False, []))
            result[name] = (was_eager or eager, [*files, str(path.relative_to(REPO))])
    return result


def declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # reads every installed package: slow


def distributions_of(module: str) -> set[str]:
    dists = _module_distributions().get(module)
    if not dists:
        pytest.fail(f"`import {module}` is not provided by any installed distribution")
    return {canonicalize_name(d) for d in dists}


def test_every_import_of_lmforge_is_a_declared_dependency():
    required = declared(PYPROJECT["dependencies"])
    extras = PYPROJECT["optional-dependencies"]
    # `dev` is the test tools, not a feature extra a user installs.
    optional = set().union(*(declared(r) for name, r in extras.items() if name != "dev"))
    imports = package_imports()
    # What lmforge imports today, so that a broken walk (finding nothing) cannot pass.
    assert {"numpy", "jinja2", "fastapi", "uvicorn", "prometheus_client", "ray"} <= set(imports)
    missing = []
    for module, (eager, files) in sorted(imports.items()):
        dists = distributions_of(module)
        ok = dists & required or (not eager and dists & optional)
        if not ok:
            where = "dependencies" if eager else "dependencies or an extra"
            missing.append(f"{module} ({'/'.join(sorted(dists))}, in {files[0]}): not in {where}")
    assert not missing, "undeclared imports:\n" + "\n".join(missing)


def test_the_walk_tells_eager_from_lazy_and_guarded_imports():
    source = (
        "import numpy\nfrom yaml import safe_load\nimport os\n"
        "try:\n    import datasets\nexcept ImportError:\n    datasets = None\n"
        "def f():\n    import matplotlib.pyplot\n"
        "if TYPE_CHECKING:\n    import pandas\n"
    )
    assert third_party_imports(source) == {
        "numpy": True,
        "yaml": True,
        "datasets": False,
        "matplotlib": False,
        "pandas": False,
    }


def test_numpy_floor_allows_only_numpy_2():
    """`np.trapezoid` (MinHash dedup) is numpy 2's name; numpy 1 has only `np.trapz`."""
    numpy = next(Requirement(r) for r in PYPROJECT["dependencies"] if r.startswith("numpy"))
    assert not numpy.specifier.contains("1.26.4") and numpy.specifier.contains("2.0.0")


def pins() -> dict[str, str]:
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (NAME==VERSION)"
            found[canonicalize_name(name)] = version
    return found


def test_constraints_pin_every_declared_dependency_and_satisfy_its_range():
    locked = pins()
    assert "lmforge" not in locked and "torch" not in locked  # torch: TORCH_SPEC chooses
    requirements = [
        Requirement(r)
        for r in [*PYPROJECT["dependencies"], *sum(PYPROJECT["optional-dependencies"].values(), [])]
    ]
    problems = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        if name not in locked:
            problems.append(f"{req} is not pinned")
        elif not req.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{req} does not allow the pinned {locked[name]}")
    assert not problems, "constraints.txt vs pyproject.toml:\n" + "\n".join(problems)


def test_every_install_goes_through_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert "CONSTRAINTS     := -c constraints.txt" in makefile
    assert "$(PIP) install $(CONSTRAINTS) -e .\n" in makefile
    assert '$(PIP) install $(CONSTRAINTS) -e ".[dev]"' in makefile
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY --chown=ray:users constraints.txt ./" in dockerfile
    assert "pip install -c constraints.txt ." in dockerfile
