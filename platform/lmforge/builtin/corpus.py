"""`builtin:python-docs`: a corpus that ships with every Python install, so nothing is downloaded.

It is the prose of the standard library: the docstrings of every module under the stdlib
directory (read with `ast`, never imported, so no module code runs), plus the language
reference topics of `pydoc_data.topics` (what `help("if")` shows). One document per module
docstring, per top-level class (its docstring and its methods'), per top-level function, and
per pydoc topic: a few MB of real English technical text, with code examples in it.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator

TOPICS = "pydoc_data/topics"
# Tests, vendored packages and tooling hold little prose and much repetition.
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "turtledemo",
}


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def python_docs_files() -> list[str]:
    """The corpus's 'files', relative to the stdlib directory, sorted; the topics come last.

    The modules that the built-in evaluation tasks ask about are held out (a fixed hash bucket
    of top-level packages, `lmforge.builtin.heldout`), so no model trained on this corpus has seen
    the answers it is evaluated on.
    """
    from lmforge.builtin.heldout import is_held_out_path

    root = stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in filenames:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if f.endswith(".py") and not is_held_out_path(rel):
                files.append(rel)
    return sorted(files) + [TOPICS]


def python_docs_records(relpath: str) -> Iterator[tuple[int, str]]:
    """(line, text) of each document of one corpus file."""
    if relpath == TOPICS:
        from pydoc_data.topics import topics

        for i, key in enumerate(sorted(topics), 1):
            yield i, f"{key}\n\n{topics[key]}"
        return
    try:
        with open(os.path.join(stdlib_dir(), relpath), "rb") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, OSError):
        return
    module = relpath[:-3].replace(os.sep, ".").removesuffix(".__init__")
    doc = ast.get_docstring(tree)
    if doc:
        yield 1, f"Module {module}\n\n{doc}"
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            parts = [_class_header(node, module)]
            if d := ast.get_docstring(node):
                parts.append(d)
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and (
                    d := ast.get_docstring(item)
                ):
                    parts.append(f"{node.name}.{item.name}({ast.unparse(item.args)})\n\n{d}")
            if len(parts) > 1:
                yield node.lineno, "\n\n".join(parts)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
            d := ast.get_docstring(node)
        ):
            yield node.lineno, f"{module}.{node.name}({ast.unparse(node.args)})\n\n{d}"


def _class_header(node: ast.ClassDef, module: str) -> str:
    bases = ", ".join(ast.unparse(b) for b in node.bases)
    return f"class {module}.{node.name}({bases})" if bases else f"class {module}.{node.name}"
