"""`builtin:stdlib-sft`: chat fine-tuning data made from the built-in corpus, nothing downloaded.

Questions about the standard library answered from its own docstrings (read with `ast`, never
imported), in a few shapes for variety:

- "What does `json.dumps(obj, *, skipkeys=False, ...)` do?" -> the first sentence of the
  function's docstring (`builtin.tasks.function_question` / `first_sentence`: the very
  question `builtin:stdlib-qa` asks);
- "Which standard library module provides `dumps()`?" -> the module, then that sentence;
- "What are the parameters of `json.dumps`?" -> its signature;
- "Summarise the docs of module `json`." -> the first paragraph of the module docstring.

Some conversations (a seeded quarter) start with a system turn. The train split comes only from
modules that `builtin.heldout` does not hold out; the val split is the held-out modules' questions,
so a model fine-tuned on train has never seen them, and `builtin:stdlib-qa` measures the skill,
not memorised answers. Every choice is seeded per item and the output is sorted, so the same
Python version always gives the same examples.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from functools import lru_cache
from typing import Any, Literal

from lmforge.builtin.heldout import module_of_path
from lmforge.builtin.tasks import (
    file_functions,
    first_sentence,
    function_question,
    heldout_files,
    parse_module,
)

SEED = 20240612
SYSTEM_PROMPTS = (
    "You are a concise assistant that answers questions about the Python standard library.",
    "Answer in one sentence.",
    "You are a Python expert. Be brief and precise.",
)
MAX_SUMMARY_WORDS = 80


def builtin_sft_examples(split: Literal["train", "val"]) -> list[dict[str, Any]]:
    """The conversations of one split: {"id": str, "messages": [{"role", "content"}, ...]},
    sorted by id. train: modules not held out; val: the held-out modules."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return list(_examples(split))


@lru_cache(maxsize=2)
def _examples(split: str) -> tuple[dict[str, Any], ...]:
    # "Which module provides f()?" only where one module has an f: `dumps` of json (train) and
    # of pickle (held out) would ask the val question in train, with another answer
    names = Counter(f["name"] for s in ("train", "val") for _, fs, _ in _parsed(s) for f in fs)
    unique = {name for name, n in names.items() if n == 1}
    out = []
    for module, functions, summary in _parsed(split):
        out += [ex for f in functions for ex in function_examples(f, f["name"] in unique)]
        if summary:
            question = f"Summarise the docs of module `{module}`."
            out.append(_example(f"{module}#summary", question, summary))
    return tuple(sorted(out, key=lambda e: e["id"]))


@lru_cache(maxsize=2)
def _parsed(split: str) -> tuple[tuple[str, list[dict[str, Any]], str], ...]:
    """(module, its documented functions, its summary) of each file of a split."""
    out = []
    for relpath in _split_files(split):
        tree = parse_module(relpath)
        if tree is not None:
            module = module_of_path(relpath)
            out.append((module, file_functions(relpath, tree), module_summary(module, tree)))
    return tuple(out)


def _split_files(split: str) -> list[str]:
    if split == "val":
        return list(heldout_files())
    from lmforge.builtin.corpus import TOPICS, python_docs_files

    return [f for f in python_docs_files() if f != TOPICS]


def function_examples(f: dict[str, Any], unique_name: bool = True) -> list[dict[str, Any]]:
    """The conversations about one function: always "what does it do?", and (seeded) one
    of "which module?" (when no other module has a function of that name) or "what are the
    parameters?" for about half of the functions."""
    name = f"{f['module']}.{f['name']}"
    out = [_example(f"{name}#what", function_question(f), f["summary"])]
    shape = random.Random(f"{SEED}-shape-{name}").random()
    if shape < 0.3 and unique_name:
        question = f"Which standard library module provides `{f['name']}()`?"
        answer = f"The `{f['module']}` module: `{name}`. {f['summary']}"
        out.append(_example(f"{name}#module", question, answer))
    elif shape < 0.5 and f["args"]:
        question = f"What are the parameters of `{name}`?"
        answer = f"`{name}({f['args']})`"
        out.append(_example(f"{name}#params", question, answer))
    return out


def module_summary(module: str, tree: ast.Module) -> str:
    """The module docstring's first paragraph (whitespace collapsed), or its first sentence
    when the paragraph is long; '' for a private module or a docstring of under 3 words."""
    doc = ast.get_docstring(tree)
    if not doc or any(part.startswith("_") for part in module.split(".")):
        return ""
    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    if len(para.split()) > MAX_SUMMARY_WORDS:
        para = first_sentence(doc)
    return para if 3 <= len(para.split()) <= MAX_SUMMARY_WORDS else ""


def _example(example_id: str, question: str, answer: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    rng = random.Random(f"{SEED}-system-{example_id}")
    if rng.random() < 0.25:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {"id": example_id, "messages": messages}
