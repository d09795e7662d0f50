"""Which parts of the built-in corpus are held out from training, for the built-in eval tasks.

The rule is a pure function of the module name, so the data stage (which skips held-out
documents) and the evaluator (which builds its tasks only from them) agree without sharing any
state: a stdlib module is held out when the blake2b hash of its *top-level package* falls in the
lowest `HELD_OUT_PERCENT` of 100 buckets. Whole packages go together (`json`, `json.decoder`,
`json.encoder`), so a held-out module's docs do not leak through its siblings. The language
reference topics (`pydoc_data/topics`) are never held out. Only torch-free stdlib code here: the
data stage imports it.
"""

from __future__ import annotations

import hashlib
import os

HELD_OUT_PERCENT = 10
_SALT = "lmforge-heldout-v1"
_TOPICS = "pydoc_data/topics"


def is_held_out(module_name: str) -> bool:
    """True when the stdlib module `module_name` (dotted, e.g. `json.decoder`) is held out."""
    top = module_name.split(".", 1)[0]
    if not top or top == "pydoc_data":
        return False
    digest = hashlib.blake2b(f"{_SALT}\0{top}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < HELD_OUT_PERCENT


def module_of_path(relpath: str) -> str:
    """The module name of a corpus file path relative to the stdlib dir (as builtin.py names it)."""
    return (
        relpath.removesuffix(".py").replace(os.sep, ".").replace("/", ".").removesuffix(".__init__")
    )


def is_held_out_path(relpath: str) -> bool:
    """True when a `builtin:python-docs` file (stdlib-relative path, e.g. `json/decoder.py`) is held out."""
    if relpath == _TOPICS:
        return False
    return is_held_out(module_of_path(relpath))
