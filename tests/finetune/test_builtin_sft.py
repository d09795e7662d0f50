"""builtin:stdlib-sft: trains only on modules the evaluation does not hold out; its val split is
exactly the held-out modules' questions, which builtin:stdlib-qa asks in the same words."""

from __future__ import annotations

import pytest

from lmforge.builtin import tasks as B
from lmforge.builtin.heldout import is_held_out
from lmforge.builtin.sft import builtin_sft_examples
from lmforge.finetune.conversation import parse_example
from lmforge.model import chat


def module_of(example_id: str) -> str:
    """`json.dumps#what` -> json; `json.decoder#summary` -> json.decoder."""
    name, shape = example_id.split("#")
    return name if shape == "summary" else name.rsplit(".", 1)[0]


@pytest.fixture(scope="module")
def splits():
    return {s: builtin_sft_examples(s) for s in ("train", "val")}


def test_train_never_comes_from_a_held_out_module_and_val_always_does(splits):
    train, val = splits["train"], splits["val"]
    assert len(train) > 1000 and len(val) > 200
    assert not any(is_held_out(module_of(e["id"])) for e in train)
    assert all(is_held_out(module_of(e["id"])) for e in val)
    # and no question text crosses over either
    asked = {e["messages"][-2]["content"] for e in train}
    assert not asked & {e["messages"][-2]["content"] for e in val}


def test_examples_are_valid_varied_and_deterministic(splits):
    train = splits["train"]
    for e in train:
        assert parse_example(e) == e["messages"]
        assert e["messages"][-1]["role"] == "assistant" and e["messages"][-1]["content"]
    shapes = {e["id"].split("#")[1] for e in train}
    assert shapes == {"what", "module", "params", "summary"}
    with_system = sum(e["messages"][0]["role"] == "system" for e in train)
    assert 0.15 < with_system / len(train) < 0.35
    assert [e["id"] for e in train] == sorted(e["id"] for e in train)
    assert builtin_sft_examples("train") == train
    with pytest.raises(ValueError, match="split must be"):
        builtin_sft_examples("test")  # type: ignore[arg-type]


def test_answers_come_from_the_docstrings(splits):
    functions = {f"{f['module']}.{f['name']}": f for f in B.heldout_functions()}
    what = [e for e in splits["val"] if e["id"].endswith("#what")]
    assert len(what) == len(functions)  # every held-out function is asked about once
    for e in what:
        f = functions[e["id"].removesuffix("#what")]
        assert e["messages"][-2]["content"] == B.function_question(f)
        assert e["messages"][-1]["content"] == f["summary"]
    json_dumps = next(e for e in splits["train"] if e["id"] == "json.dumps#what")
    assert json_dumps["messages"][-2:] == [
        {
            "role": "user",
            "content": "What does `json.dumps(obj, *, skipkeys=False, ensure_ascii=True, ...)` do?",
        },
        {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."},
    ]


def test_the_eval_task_asks_the_held_out_questions_of_the_sft_val_split(splits):
    val = {
        chat.render(e["messages"][-2:-1], add_generation_prompt=True): e["messages"][-1]["content"]
        for e in splits["val"]
        if e["id"].endswith("#what")
    }
    items = B.builtin_items("stdlib-qa")
    assert len(items) == min(B.MAX_ITEMS, len(val))
    for item in items:
        assert item["references"] == [val[item["prompt"]]]
