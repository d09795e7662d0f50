"""Built-in tasks: built only from held-out modules, deterministic, well-formed."""

from __future__ import annotations

from lmforge.eval import builtin_tasks as B
from lmforge.eval.heldout import is_held_out, is_held_out_path, module_of_path
from lmforge.eval.tasks import check_item


def test_held_out_rule_is_a_pure_function_of_the_top_level_package():
    names = [module_of_path(f) for f in B.heldout_files()]
    assert names and all(is_held_out(n) for n in names)
    tops = {n.split(".")[0] for n in names}
    for top in tops:  # a whole package goes together
        assert is_held_out(f"{top}.anything.below")
    assert not is_held_out_path("pydoc_data/topics")
    assert module_of_path("json/__init__.py") == "json"
    assert module_of_path("email/mime/text.py") == "email.mime.text"
    # roughly HELD_OUT_PERCENT of top-level names
    from lmforge.data.builtin import python_docs_files

    all_tops = {module_of_path(f).split(".")[0] for f in python_docs_files()[:-1]}
    share = len(tops) / len(all_tops)
    assert 0.03 < share < 0.2


def test_module_choice_items_come_from_held_out_modules_only():
    items = B.builtin_items("stdlib-module-mc")
    assert len(items) >= 50
    for item in items:
        assert check_item("multiple_choice", item) == ""
        assert len(set(item["choices"])) == 4
        assert all(is_held_out(c) for c in item["choices"])
        tops = [c.split(".")[0] for c in item["choices"]]
        assert len(set(tops)) == 4  # no two choices from one package
    assert B.builtin_items("stdlib-module-mc") == items  # deterministic
    # the answer is spread over positions, not always first
    assert len({i["answer"] for i in items}) == 4


def test_docstring_generation_items_reference_the_first_sentence():
    items = B.builtin_items("stdlib-docstring-gen")
    functions = {f"{f['module']}.{f['name']}": f for f in B.heldout_functions()}
    for item in items:
        name = item["prompt"].split("(")[0]
        assert is_held_out(name) and name in functions
        assert item["references"] == [functions[name]["summary"]]
    assert B.first_sentence("Return the sum.  More text here.\n\nDetails.") == "Return the sum."
    assert B.first_sentence("No period at all\nwraps here") == "No period at all wraps here"


def test_bias_pairs_ship_with_the_package():
    pairs = B.builtin_items("bias-pairs")
    assert 20 <= len(pairs) <= 40
    for p in pairs:
        assert check_item("bias_pairs", p) == ""
        assert p["sent_more"] != p["sent_less"] and p["bias_type"]
