"""Built-in tasks: built only from held-out modules, deterministic, well-formed."""

from __future__ import annotations

from lmforge.builtin import tasks as B
from lmforge.builtin.heldout import is_held_out, is_held_out_path, module_of_path
from lmforge.eval.tasks import builtin_task, check_item


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
    from lmforge.builtin.corpus import python_docs_files

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


def test_stdlib_qa_asks_the_sft_chat_question_about_held_out_functions():
    from lmforge.model import chat

    spec = builtin_task("stdlib-qa")
    assert spec.type == "generation" and "\n" in spec.stop
    items = B.builtin_items("stdlib-qa")
    functions = {f"{f['module']}.{f['name']}": f for f in B.heldout_functions()}
    assert len(items) == min(B.MAX_ITEMS, len(functions)) and len(items) >= 50
    for item in items:
        assert check_item("generation", item) == ""
        name = item["prompt"].split("`")[1].split("(")[0]
        f = functions[name]
        assert is_held_out(f["module"])
        question = f"What does `{name}({B.short_signature(f['args'])})` do?"
        expected = [{"role": "user", "content": question}]
        assert item["prompt"] == chat.render(expected, add_generation_prompt=True)
        assert item["references"] == [f["summary"]]
    assert B.builtin_items("stdlib-qa") == items
    assert B.short_signature("a, b") == "a, b"
    assert B.short_signature("obj, *, skipkeys=False, ensure_ascii=True", 20) == "obj, *, ..."


def test_stdlib_qa_generation_stops_at_end_of_turn():
    """The prompt's role tokens are single special ids, and the answer ends at <|end|> (a token,
    dropped from decoded text) or at a newline, through the eval scorer."""
    from types import SimpleNamespace

    import torch

    from lmforge.data.tokenizer import train_bpe
    from lmforge.eval.lm import Scorer
    from lmforge.eval.scoring import build_requests, encode
    from lmforge.eval.tasks import Items
    from lmforge.model.special import LMFORGE

    EOS_ID, END_ID = LMFORGE.eos_id, LMFORGE.stop_ids[1]

    class Scripted(torch.nn.Module):
        def __init__(self, script: list[int], prompt_len: int, vocab: int) -> None:
            super().__init__()
            self.cfg = SimpleNamespace(max_seq_len=512)
            self.script, self.prompt_len, self.vocab = script, prompt_len, vocab

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*tokens.shape, self.vocab)
            logits[:, -1, self.script[tokens.shape[1] - self.prompt_len]] = 10.0
            return logits

    spec = builtin_task("stdlib-qa")
    items = Items(rows=B.builtin_items("stdlib-qa")[:1], lines=[1])
    answer = items.rows[0]["references"][0]
    tok = train_bpe([answer, items.rows[0]["prompt"]] * 10, vocab_size=300, min_frequency=0)
    gen = {"max_new_tokens": 32, "temperature": 0.0, "top_k": None, "seed": 0}
    (request,) = build_requests(spec, items, tok, 512, gen)
    user, assistant = tok.token_to_id("<|user|>"), tok.token_to_id("<|assistant|>")
    assert request["prompt"][:2] == [EOS_ID, user] and assistant in request["prompt"]
    assert request["stop"] == spec.stop and request["max_new_tokens"] == 64
    request["max_new_tokens"] = 200  # this tiny tokenizer spends a token on most characters
    for tail in ([END_ID], encode(tok, "\nMore text.") + [END_ID]):
        script = encode(tok, answer) + tail + encode(tok, " trailing junk") + [EOS_ID] * 200
        scorer = Scorer(Scripted(script, len(request["prompt"]), tok.get_vocab_size()), tok)
        assert scorer.score([request])[0]["text"] == answer
