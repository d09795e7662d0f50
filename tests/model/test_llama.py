from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lmforge.model import PRESETS, Llama, LlamaConfig, flops_per_token, model_config, num_params
from lmforge.model.artifact import load_model, save_artifact
from lmforge.model.llama import cross_entropy
from tests.numerics import assert_same_math, model_terms


def small_cfg(**kw) -> LlamaConfig:
    return model_config("debug", **kw)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_forward_shapes_and_gqa(n_kv_heads):
    torch.manual_seed(0)
    cfg = small_cfg(n_kv_heads=n_kv_heads)
    model = Llama(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, cfg.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.layers["0"].attn.wk.weight.shape == (n_kv_heads * cfg.head_dim, cfg.dim)


def test_changing_a_future_token_never_changes_past_logits():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = Llama(cfg).eval().double()  # the masking's math, not fp32 rounding (tests/numerics.py)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        base = model(tokens)
        for t in (1, 10, 23):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
            out = model(changed)
            assert_same_math(out[:, :t], base[:, :t], torch.float64, **model_terms(cfg, 24))
            assert not torch.allclose(out[:, t], base[:, t])  # the changed position itself moves


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_formula_matches_the_module(name):
    with torch.device("meta"):
        model = Llama(PRESETS[name])
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == num_params(PRESETS[name])


def test_preset_sizes_are_as_advertised():
    sizes = {name: num_params(cfg) / 1e6 for name, cfg in PRESETS.items()}
    assert 8 <= sizes["tiny"] <= 15
    assert 110 <= sizes["small"] <= 140
    assert 950 <= sizes["1b"] <= 1300
    assert 7500 <= sizes["8b"] <= 8200


def test_flops_formula_matches_a_flop_counter():
    """6 N_matmul + 12 L D T against torch's own count of a forward + backward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = small_cfg(tie_embeddings=False)
    model = Llama(cfg)
    B, T = 2, 32
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        cross_entropy(model(tokens), tokens).backward()
    counted = counter.get_total_flops()
    # torch's counter has no formula for the CPU SDPA kernel, so the attention term is checked
    # by hand: QK^T and AV are 2 x (2 T E) FLOPs per query per head, x H heads = 4 T D forward,
    # x3 for forward + backward, per layer.
    attention = 12 * cfg.n_layers * cfg.dim * T
    assert attention == 3 * cfg.n_layers * 2 * (2 * T * cfg.head_dim) * cfg.n_heads
    matmuls = flops_per_token(cfg, T) - attention
    assert counted == pytest.approx(matmuls * B * T, rel=1e-6)


@pytest.mark.parametrize("name", ["debug", "tiny"])
def test_initial_loss_is_close_to_uniform(name):
    torch.manual_seed(0)
    cfg = PRESETS[name]
    model = Llama(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 33))
    with torch.no_grad():
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.5


def test_same_seed_same_weights_and_init_weights_is_idempotent():
    cfg = small_cfg()
    torch.manual_seed(3)
    a = Llama(cfg)
    torch.manual_seed(3)
    b = Llama(cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    b.init_weights(seed=1)
    a.init_weights(seed=1)
    assert torch.equal(a.output.weight, b.output.weight)
    assert a.output.weight.data_ptr() == a.tok_embeddings.weight.data_ptr()  # still tied


@pytest.mark.parametrize("tied", [True, False])
def test_artifact_round_trip_gives_the_same_logits(tmp_path, tied):
    torch.manual_seed(0)
    cfg = small_cfg(tie_embeddings=tied)
    model = Llama(cfg).eval()
    save_artifact(
        str(tmp_path), model.state_dict(), cfg, tokenizer_json="{}", resolved_config="a: 1\n"
    )
    loaded = load_model(str(tmp_path))
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "resolved_config.yaml",
        "tokenizer.json",
        "version.json",
    ]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        Llama(small_cfg(max_seq_len=8))(torch.zeros(1, 9, dtype=torch.long))


def test_model_and_parallelize_import_with_torch_alone():
    """A GPU box with torch only runs bench/gpu_train.py: no pydantic, yaml, pyarrow or ray."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pydantic', 'yaml', 'ray', 'pyarrow'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import lmforge.model.llama, lmforge.model.presets, lmforge.train.parallelize\n"
        "import lmforge.train.mfu, lmforge.train.optim\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_packed_documents_give_the_same_per_document_loss_as_alone():
    """Document masking and position reset: each packed example computes exactly as unpacked."""
    from lmforge.model.llama import document_mask, segment_positions

    torch.manual_seed(0)
    cfg = small_cfg()
    model = Llama(cfg).eval().double()  # the masking's math, not fp32 rounding (tests/numerics.py)
    bound = model_terms(cfg, 32)
    docs = [torch.randint(7, cfg.vocab_size, (n,)) for n in (9, 5, 12)]
    packed = torch.cat(docs + [torch.zeros(6, dtype=torch.long)])[None]  # 26 + 6 pad = 32
    segments = torch.cat(
        [torch.full((len(d),), i + 1) for i, d in enumerate(docs)] + [torch.zeros(6)]
    ).long()[None]
    assert segment_positions(segments)[0, :14].tolist() == list(range(9)) + list(range(5))
    mask = document_mask(segments)[0, 0]
    assert mask[9, 8].item() is False and mask[9, 9].item() is True and mask[8, 0].item() is True
    with torch.no_grad():
        together = model(packed, segments=segments)[0]  # (T, V)
        start = 0
        for doc in docs:
            alone = model(doc[None])[0]
            got = together[start : start + len(doc)]
            assert_same_math(got, alone, torch.float64, **bound)
            loss_alone = cross_entropy(alone[None, :-1], doc[None, 1:])
            loss_packed = cross_entropy(got[None, :-1], doc[None, 1:])
            assert_same_math(loss_packed, loss_alone, torch.float64, **bound)
            start += len(doc)
        # Without the mask and reset the later documents would see the earlier ones.
        leaky = model(packed)[0]
        assert not torch.allclose(leaky[9:14], together[9:14], atol=1e-3)
