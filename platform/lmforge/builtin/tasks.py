"""Built-in tasks that need no download, derived at run time from the built-in corpus.

They are built only from the stdlib modules that `lmforge.builtin.heldout.is_held_out` holds out
of `builtin:python-docs` (the data stage skips those documents), read with `ast` as the corpus
itself is, never imported. The items are sorted, and a seeded sample keeps a spread of modules
when a limit applies, so the same Python version always gives the same items.

- `stdlib-module-mc`: "which module documents this function?" given its signature and the first
  sentence of its docstring. Four choices: the function's module and one module from each of
  three other held-out packages (drawn as the modules of random other functions, so a module is
  as likely to be a distractor as an answer), in a seeded order.
- `stdlib-docstring-gen`: "what does `module.function` do?" The prompt is the corpus's own
  header of a function document, `module.function(args)`; the model writes the blank line and
  the docstring, and the text up to the first sentence end (stops ". " and ".\n") is scored
  with F1 (and exact match) against the first sentence of the docstring. The prompt does not end
  with the blank line: byte-level BPE tokenizes a trailing "\n\n" as a token that never precedes
  text in training, and a model prompted with it goes astray.
- `stdlib-qa`: the same question as `stdlib-docstring-gen`, asked in the chat format the way the
  built-in SFT data (`builtin:stdlib-sft`, lmforge.builtin.sft) asks it: the prompt is
  `chat.render([user: "What does `module.function(args)` do?"], add_generation_prompt=True)`
  (`function_question`), and the assistant's answer is scored with F1 and exact match against
  the docstring's first sentence. The SFT data trains only on the other modules' questions, so
  this measures whether fine-tuning taught the skill rather than the answers. Generation ends at
  `<|end|>` by token id (the scorer and the serving engine stop on it; decoded text drops
  special tokens, so it is not a stop string) and at "\n", since the answers are one line.
- `stdlib-heldout-text`: perplexity and bits-per-byte of the held-out documents, exactly as the
  corpus renders them (module, class and function documents).
- `bias-pairs`: a small CrowS-Pairs-style probe set written for lmforge
  (resources/eval/bias_pairs.jsonl).
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from lmforge import ConfigError
from lmforge.builtin.heldout import is_held_out_path, module_of_path

SAMPLE_SEED = 20240611
MAX_ITEMS = 400  # per built-in task, before a task's `limit`

BUILTIN_TASKS: dict[str, dict[str, Any]] = {
    "stdlib-module-mc": {
        "type": "multiple_choice",
        "prompt": "Function: {function}\nDescription: {summary}\n"
        "Question: Which Python standard library module documents this function?\nAnswer:",
    },
    "stdlib-docstring-gen": {
        "type": "generation",
        # No "\n\n" stop: the answer starts with the blank line after the header (see above).
        "stop": [". ", ".\n"],
    },
    "stdlib-qa": {
        "type": "generation",
        # <|end|> itself stops generation by token id (lm.Scorer, generate.py); as a string it
        # only matters to a client that decodes special tokens. Answers are one line.
        "stop": ["<|end|>", "\n"],
        "max_new_tokens": 64,  # a first sentence runs up to 40 words
    },
    "stdlib-heldout-text": {"type": "perplexity"},
    "bias-pairs": {"type": "bias_pairs"},
}


def builtin_items(name: str) -> list[dict[str, Any]]:
    if name == "bias-pairs":
        path = resources.files("lmforge") / "resources" / "eval" / "bias_pairs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if name == "stdlib-heldout-text":
        return _sample(heldout_documents())
    functions = heldout_functions()
    if name == "stdlib-module-mc":
        return _sample(module_choice_items(functions))
    if name == "stdlib-docstring-gen":
        return _sample(
            [
                {
                    "prompt": f"{f['module']}.{f['name']}({f['args']})",
                    "references": [f["summary"]],
                }
                for f in functions
            ]
        )
    if name == "stdlib-qa":
        return _sample([qa_item(f) for f in functions])
    raise ConfigError(f"unknown built-in task 'builtin:{name}'")


def short_signature(args: str, limit: int = 48) -> str:
    """A function's arguments, cut after the last whole argument within `limit` characters
    (`obj, *, skipkeys=False, ...`), so a question stays one readable line."""
    if len(args) <= limit:
        return args
    cut = args.rfind(", ", 0, limit)
    return (args[:cut] if cut > 0 else args.split(",", 1)[0]) + ", ..."


def function_question(f: dict[str, Any]) -> str:
    """The user question about a function that `builtin:stdlib-sft` trains on and
    `builtin:stdlib-qa` asks about the held-out functions."""
    return f"What does `{f['module']}.{f['name']}({short_signature(f['args'])})` do?"


def qa_item(f: dict[str, Any]) -> dict[str, Any]:
    from lmforge.model import chat

    question = [{"role": "user", "content": function_question(f)}]
    return {
        "prompt": chat.render(question, add_generation_prompt=True),
        "references": [f["summary"]],
    }


def _sample(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most MAX_ITEMS rows in a seeded random order, so any first k (a task's limit) are a
    random sample across modules rather than the alphabetically first ones."""
    order = list(range(len(rows)))
    random.Random(SAMPLE_SEED).shuffle(order)
    return [rows[i] for i in order[:MAX_ITEMS]]


@lru_cache(maxsize=1)
def heldout_files() -> tuple[str, ...]:
    """The held-out corpus files (stdlib-relative .py paths), sorted. Listed here rather than
    through `python_docs_files()`, which leaves them out of the training corpus."""
    from lmforge.builtin import corpus

    root = corpus.stdlib_dir()
    skip = corpus._SKIP_DIRS
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if name.endswith(".py") and is_held_out_path(rel):
                found.append(rel)
    return tuple(sorted(found))


@lru_cache(maxsize=1)
def heldout_documents() -> list[dict[str, Any]]:
    from lmforge.builtin.corpus import python_docs_records

    return [{"text": text} for f in heldout_files() for _, text in python_docs_records(f)]


def first_sentence(doc: str) -> str:
    """The docstring's first sentence: its first paragraph up to '. ' (or the paragraph's end)."""
    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    match = re.search(r"(?<=[.!?])\s", para)
    return para[: match.start()] if match else para


@lru_cache(maxsize=1)
def heldout_functions() -> list[dict[str, Any]]:
    """Public top-level functions of the held-out modules with a usable first sentence."""
    found = [f for relpath in heldout_files() for f in file_functions(relpath)]
    return sorted(found, key=lambda f: (f["module"], f["name"]))


def parse_module(relpath: str) -> ast.Module | None:
    """The syntax tree of a stdlib file (stdlib-relative path), or None if it does not parse."""
    from lmforge.builtin.corpus import stdlib_dir

    try:
        with open(os.path.join(stdlib_dir(), relpath), "rb") as f:
            return ast.parse(f.read())
    except (SyntaxError, ValueError, OSError):
        return None


def file_functions(relpath: str, tree: ast.Module | None = None) -> list[dict[str, Any]]:
    """Public top-level functions of one stdlib file whose docstring's first sentence is 3 to
    40 words: {module, name, args, summary}; none for a private module (`_foo`, `a._b`)."""
    module = module_of_path(relpath)
    if any(part.startswith("_") for part in module.split(".")):
        return []
    tree = tree if tree is not None else parse_module(relpath)
    found = []
    for node in tree.body if tree is not None else []:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if node.name.startswith("_") or not doc:
            continue
        summary = first_sentence(doc)
        if 3 <= len(summary.split()) <= 40:
            found.append(
                {
                    "module": module,
                    "name": node.name,
                    "args": ast.unparse(node.args),
                    "summary": summary,
                }
            )
    return found


def module_choice_items(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Four-way "which module?" items: the answer and one module from each of three other
    packages. A distractor is the module of a random function of another package, so every
    module is as likely to be a distractor as to be an answer, and a model that only prefers
    short (or long) module names scores chance, not better or worse."""

    def package(module: str) -> str:
        return module.split(".")[0]

    items = []
    for f in functions:
        pool = [g["module"] for g in functions if package(g["module"]) != package(f["module"])]
        if len({package(m) for m in pool}) < 3:
            continue
        rng = random.Random(f"{SAMPLE_SEED}-{f['module']}.{f['name']}")
        choices, seen = [f["module"]], {package(f["module"])}
        while len(choices) < 4:
            module = rng.choice(pool)
            if package(module) not in seen:
                choices.append(module)
                seen.add(package(module))
        rng.shuffle(choices)
        items.append(
            {
                "function": f"{f['name']}({f['args']})",
                "summary": f["summary"],
                "context": f"{f['name']}",
                "choices": choices,
                "answer": choices.index(f["module"]),
            }
        )
    return items
