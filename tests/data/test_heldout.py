"""The built-in corpus never contains what the built-in evaluation tasks ask about."""

from lmforge.builtin.corpus import _SKIP_DIRS, TOPICS, python_docs_files
from lmforge.builtin.heldout import is_held_out_path


def test_builtin_corpus_leaves_out_every_held_out_module():
    import os
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    every = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS]
        every |= {os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")}
    held = {p for p in every if is_held_out_path(p)}
    corpus = set(python_docs_files())
    assert held, "the held-out rule holds nothing out"
    assert not held & corpus
    assert corpus == (every - held) | {TOPICS}
