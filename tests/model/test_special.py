"""An imported Hugging Face model keeps its own special tokens and chat template everywhere:
generation, serving, eval and fine-tuning, checked against transformers itself.

The model is made here: a Llama with random weights and a byte-level BPE whose special ids are
not lmforge's (BOS 0, EOS 3, <|im_end|> 4; ids 2 and 6 are ordinary tokens), with its own
ChatML-like template that writes the BOS itself."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.model.special import LMFORGE, SpecialTokens, load_special_tokens

transformers = pytest.importorskip("transformers")

BOS, PAD, IM_START, EOS, IM_END = range(5)
SPECIALS = ["<s>", "<pad>", "<|im_start|>", "</s>", "<|im_end|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "What does os.getcwd do? Return the current working directory.",
    "def add(a, b):\n    return a + b",
] * 20
MESSAGES = [{"role": "user", "content": "What does os.getcwd do?"}]
MAX_NEW = 24


def hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    # As Llama's tokenizer.json: encoding a text adds the BOS.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(5))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=TEMPLATE,
    )


def greedy(model, ids: list[int], **kwargs) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        **kwargs,
    )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(artifact dir, HF tokenizer, HF model, chat prompt ids, HF's greedy answer to them)."""
    from lmforge.model.command import import_command

    root = tmp_path_factory.mktemp("imported")
    tok = hf_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # sharper logits: no near-ties between two implementations
    prompt = list(
        tok.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    # Make the model answer with its EOS: swap the lm_head rows of EOS and of the token greedy
    # decoding picks 6th, so the answer ends there with EOS instead.
    free = greedy(model, prompt, eos_token_id=None)
    target = free[5]
    assert target not in free[:5] and EOS not in free and IM_END not in free
    with torch.no_grad():
        head = model.lm_head.weight
        head[[EOS, target]] = head[[target, EOS]].clone()
    model.generation_config.eos_token_id = [EOS, IM_END]
    model.generation_config.bos_token_id = BOS
    model.generation_config.pad_token_id = PAD
    hf_dir, art = root / "hf", root / "art"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    assert import_command([str(hf_dir), "--out", str(art)], "lmforge import") == 0
    expected = greedy(model, prompt)
    assert expected == free[:5] + [EOS]  # HF itself stops at the EOS
    return str(art), tok, model, prompt, expected


def test_special_tokens_come_from_the_artifact(imported):
    art, tok, *_ = imported
    special = load_special_tokens(art)
    assert (special.bos_id, special.eos_id, special.stop_ids) == (BOS, EOS, (EOS, IM_END))
    assert special.prefix_id == BOS and special.add_bos
    assert (special.bos_token, special.eos_token) == ("<s>", "</s>")
    assert special.chat_template == TEMPLATE
    # lmforge's own artifacts keep lmforge's ids and the built-in format
    assert SpecialTokens(bos_id=1, eos_id=2, stop_ids=(2, 6), prefix_id=2) == LMFORGE


def test_chat_renders_with_the_models_own_template(imported):
    art, tok, _, prompt, _ = imported
    special = load_special_tokens(art)
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(f"{art}/tokenizer.json")
    text, ids = special.encode_chat(ours, MESSAGES)
    assert text == tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|im_start|>user\n") and ids == prompt and ids.count(BOS) == 1


def test_generation_stops_at_the_models_eos_as_transformers_does(imported):
    from tokenizers import Tokenizer

    from lmforge.model.artifact import load_model
    from lmforge.model.generate import SamplingParams, generate

    art, tok, _, prompt, expected = imported
    ours = Tokenizer.from_file(f"{art}/tokenizer.json")
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    (result,) = generate(load_model(art), ours, [prompt], params, load_special_tokens(art))
    assert result["tokens"] == expected and result["finish_reason"] == "stop"
    assert result["text"] == tok.decode(expected, skip_special_tokens=True)


def test_serve_answers_equal_transformers_greedy_output(imported):
    from fastapi.testclient import TestClient

    from lmforge.serve.config import ServeArgs
    from lmforge.serve.openai import local_app

    art, tok, model, prompt, expected = imported
    args = ServeArgs(models=[{"name": "imported", "artifact": art, "max_batch_size": 2}])
    with TestClient(local_app(args)) as client:
        body = {"model": "imported", "messages": MESSAGES, "max_tokens": MAX_NEW, "temperature": 0}
        answer = client.post("/v1/chat/completions", json=body).json()
        assert "choices" in answer, answer
        info = client.get("/tokenizer_info").json()
        chat_ids = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        text = "the quick brown"
        completion = client.post(
            "/v1/completions",
            json={"model": "imported", "prompt": text, "max_tokens": 8, "temperature": 0},
        ).json()
    assert chat_ids == prompt  # one BOS: the template's, none added by tokenizing
    choice = answer["choices"][0]
    assert choice["message"]["content"] == tok.decode(expected, skip_special_tokens=True)
    assert choice["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == len(expected)
    assert (info["bos_token"], info["eos_token"], info["chat_template"]) == (
        "<s>",
        "</s>",
        TEMPLATE,
    )
    # a plain-text prompt starts with the BOS, as transformers encodes it
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS and completion["usage"]["prompt_tokens"] == len(ids)
    theirs = greedy(model, ids)[:8]
    assert completion["choices"][0]["text"] == tok.decode(theirs, skip_special_tokens=True)


def test_eval_contexts_start_with_the_models_bos(imported):
    from lmforge.eval.lm import Scorer
    from lmforge.eval.scoring import build_requests
    from lmforge.eval.tasks import Items, TaskSpec

    art, tok, model, prompt, expected = imported
    scorer = Scorer.from_artifact(art)
    assert scorer.special.prefix_id == BOS
    gen = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "top_k": None, "seed": 0}
    text = TaskSpec(name="ppl", type="perplexity", file="unused.jsonl")
    mc = TaskSpec(name="mc", type="multiple_choice", file="unused.jsonl", prompt="{q}")
    items = Items(
        rows=[{"text": TEXTS[0], "q": "What", "choices": [" does", " is"], "answer": 0}], lines=[1]
    )
    requests = build_requests(text, items, scorer.tokenizer, 64, gen, scorer.special)
    requests += build_requests(mc, items, scorer.tokenizer, 64, gen, scorer.special)
    assert [r["context"][0] for r in requests] == [BOS, BOS, BOS]
    # the log-likelihood of a document is transformers' over the same BOS-prefixed tokens
    (ll,) = scorer.score(requests[:1])
    ids = torch.tensor([[BOS, *requests[0]["continuation"]]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    theirs = logp.gather(1, ids[0, 1:, None]).sum().item()
    assert ll["loglikelihood"] == pytest.approx(theirs, rel=1e-4)
    # generation stops at the model's EOS (the prompt already starts with the template's BOS)
    answer = scorer.score([{"kind": "generate", "prompt": prompt, "max_new_tokens": MAX_NEW}])
    assert answer[0]["text"] == tok.decode(expected, skip_special_tokens=True)


def test_sft_examples_follow_the_models_template_bos_and_eos(imported):
    from tokenizers import Tokenizer

    from lmforge.finetune.conversation import encode_conversation

    art, tok, *_ = imported
    ours = Tokenizer.from_file(f"{art}/tokenizer.json")
    answer = "Return the current working directory."
    messages = [*MESSAGES, {"role": "assistant", "content": answer}]
    ids, mask = encode_conversation(ours, messages, "assistant", load_special_tokens(art))
    rendered = tok.apply_chat_template(messages, tokenize=False)
    # one BOS (the template's), the template's tokens, then the model's EOS as a target
    assert ids[0] == BOS and ids.count(BOS) == 1 and ids[-1] == EOS and mask[-1] == 1
    assert ids[:-1] == tok(rendered, add_special_tokens=False)["input_ids"]
    targets = ours.decode(
        [i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False
    )
    assert targets == answer + "<|im_end|></s>"


def test_export_of_an_imported_model_keeps_its_tokens(imported, tmp_path):
    from lmforge.model.hf import export_hf

    art, *_ = imported
    export_hf(art, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 3, 1)
    assert generation["eos_token_id"] == [EOS, IM_END]
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert back.apply_chat_template(MESSAGES, tokenize=False) == "<s><|im_start|>user\n" + (
        "What does os.getcwd do?<|im_end|>\n"
    )
