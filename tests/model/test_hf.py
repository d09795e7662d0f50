"""HF export/import checked against transformers itself: same logits, exact round trip."""

import json

import pytest
import torch

from lmforge import LmforgeError
from lmforge.data.tokenizer import train_bpe
from lmforge.model import chat
from lmforge.model.artifact import load_model, save_artifact
from lmforge.model.hf import export_hf, from_hf_rows, import_hf, to_hf_rows
from lmforge.model.llama import Llama, LlamaConfig
from tests.numerics import assert_same_math, model_terms

transformers = pytest.importorskip("transformers")


def tiny_tokenizer_json() -> str:
    texts = ["Return the current working directory."] * 20 + ["What does os.getcwd do?"] * 20
    return train_bpe(texts, vocab_size=300, min_frequency=0).to_str()


def make_artifact(path, tie: bool, n_kv_heads: int = 2, vocab: int = 300):
    cfg = LlamaConfig(
        vocab_size=vocab,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        ffn_dim=96,
        max_seq_len=64,
        rope_theta=500.0,
        tie_embeddings=tie,
    )
    torch.manual_seed(0)
    model = Llama(cfg)
    # Non-trivial norm weights, so a swapped or missing norm shows in the logits.
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    save_artifact(
        str(path),
        model.state_dict(),
        cfg,
        tokenizer_json=tiny_tokenizer_json(),
        resolved_config="x: 1\n",
    )
    return model


def test_rotary_row_permutation_is_invertible():
    w = torch.randn(4 * 16, 32)
    assert torch.equal(from_hf_rows(to_hf_rows(w, 4), 4), w)
    assert not torch.equal(to_hf_rows(w, 4), w)


@pytest.mark.parametrize("tie,n_kv_heads", [(True, 2), (False, 4), (False, 1)])
def test_transformers_gives_the_same_logits(tmp_path, tie, n_kv_heads):
    ours = make_artifact(tmp_path / "art", tie, n_kv_heads).eval()
    export_hf(str(tmp_path / "art"), str(tmp_path / "hf"))
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "hf"), torch_dtype=torch.float32
    ).eval()
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        expected = ours(tokens)
        got = theirs(tokens).logits
    # fp32 on both sides (transformers' norms and RoPE compute in fp32 whatever the dtype): the
    # bound of two fp32 summation orders through the network (tests/numerics.py).
    assert_same_math(got, expected, torch.float32, **model_terms(ours.cfg, 40))


def test_import_round_trips_exactly(tmp_path):
    make_artifact(tmp_path / "art", tie=False)
    export_hf(str(tmp_path / "art"), str(tmp_path / "hf"))
    cfg = import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert cfg.rope_theta == 500.0 and cfg.n_kv_heads == 2 and not cfg.tie_embeddings
    a, b = load_model(str(tmp_path / "art")), load_model(str(tmp_path / "back"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_exported_tokenizer_has_the_chat_template_and_special_tokens(tmp_path):
    make_artifact(tmp_path / "art", tie=True)
    export_hf(str(tmp_path / "art"), str(tmp_path / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    messages = [{"role": "user", "content": "What does os.getcwd do?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == chat.render(messages, add_generation_prompt=True)
    assert tok.eos_token == "<|eos|>" and tok.pad_token_id == 0 and tok.bos_token_id == 1
    # transformers' tokenizer encodes exactly as ours, special tokens and all
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tmp_path / "art" / "tokenizer.json"))
    for sample in [text, "Return the current directory.\n\n  x = os.getcwd()  # ünïcode"]:
        assert (
            tok(sample, add_special_tokens=False)["input_ids"]
            == ours.encode(sample, add_special_tokens=False).ids
        )
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 6]


def test_import_refuses_what_it_cannot_represent(tmp_path):
    make_artifact(tmp_path / "art", tie=True)
    export_hf(str(tmp_path / "art"), str(tmp_path / "hf"))
    cfg_path = tmp_path / "hf" / "config.json"
    base = json.loads(cfg_path.read_text())
    for change, message in [
        ({"model_type": "gpt2"}, "not a Llama-family model"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope scaling 'llama3'"),
    ]:
        cfg_path.write_text(json.dumps({**base, **change}))
        with pytest.raises(LmforgeError, match=message):
            import_hf(str(tmp_path / "hf"), str(tmp_path / "x"))
    with pytest.raises(LmforgeError, match="no config.json"):
        import_hf(str(tmp_path / "nothing"), str(tmp_path / "x"))


def test_chat_render_rejects_unknown_roles():
    with pytest.raises(ValueError, match="message 0: role must be one of"):
        chat.render([{"role": "robot", "content": "hi"}])


def test_resolve_artifact_follows_a_run_reference(tmp_path):
    from lmforge.model.artifact import resolve_artifact
    from lmforge.stage import latest_pointer

    run = tmp_path / "runs" / "train" / "base-0123456789ab"
    make_artifact(run / "model", tie=True)
    assert resolve_artifact(str(run)) == str(run / "model")
    pointer = latest_pointer(str(tmp_path / "runs"), "train", "base")
    with pytest.raises(LmforgeError, match="no completed 'train' run called 'base'"):
        resolve_artifact(f"{tmp_path}/runs/@train/base")
    (tmp_path / "runs" / "train" / "base.latest").write_text(f"{run}\n")
    assert pointer.endswith("base.latest")
    assert resolve_artifact(f"{tmp_path}/runs/@train/base") == str(run / "model")
    with pytest.raises(LmforgeError, match="bad run reference"):
        resolve_artifact(f"{tmp_path}/runs/@train")


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_import_keeps_the_models_own_chat_template(tmp_path):
    from lmforge.model.special import artifact_chat_template

    make_artifact(tmp_path / "art", tie=True)
    assert artifact_chat_template(str(tmp_path / "art")) is None  # trained here: built-in format
    export_hf(str(tmp_path / "art"), str(tmp_path / "hf"))
    config_path = tmp_path / "hf" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": CHATML}))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    kept = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert kept == {**config, "chat_template": CHATML}
    assert artifact_chat_template(str(tmp_path / "back")) == CHATML
    # and an export of the imported model carries that template, not the built-in one
    export_hf(str(tmp_path / "back"), str(tmp_path / "hf2"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf2"))
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_import_folds_a_chat_template_file_into_the_tokenizer_config(tmp_path):
    from lmforge.model.special import artifact_chat_template

    make_artifact(tmp_path / "art", tie=True)
    export_hf(str(tmp_path / "art"), str(tmp_path / "hf"))
    config_path = tmp_path / "hf" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]  # newer transformers save it as chat_template.jinja
    config_path.write_text(json.dumps(config))
    (tmp_path / "hf" / "chat_template.jinja").write_text(CHATML)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    kept = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert kept["chat_template"] == CHATML and kept["eos_token"] == "<|eos|>"
    assert artifact_chat_template(str(tmp_path / "hf")) == CHATML
    # a list of named templates: the 'default' one
    config_path.write_text(json.dumps({"chat_template": [{"name": "default", "template": "x"}]}))
    (tmp_path / "hf" / "chat_template.jinja").unlink()
    assert artifact_chat_template(str(tmp_path / "hf")) == "x"
    # no tokenizer config at all: nothing to keep
    config_path.unlink()
    import_hf(str(tmp_path / "hf"), str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "tokenizer_config.json").exists()
    assert artifact_chat_template(str(tmp_path / "plain")) is None
