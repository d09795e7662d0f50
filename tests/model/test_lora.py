from __future__ import annotations

import pytest
import torch

from lmforge.model import Llama, model_config
from lmforge.model.lora import (
    LoRALinear,
    apply_lora,
    init_lora_weights,
    merge_lora_state,
)
from tests.numerics import assert_same_math, model_terms


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (tied weights counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def lora_model(targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), rank=4, alpha=8.0):
    torch.manual_seed(0)
    model = Llama(model_config("debug"))
    reference = Llama(model_config("debug"))
    reference.load_state_dict(model.state_dict())
    adapted = apply_lora(model, rank, alpha, 0.0, list(targets))
    return model.eval(), reference.eval(), adapted


def test_zero_initialised_b_leaves_outputs_unchanged_and_only_adapters_train():
    model, reference, adapted = lora_model()
    assert len(adapted) == 7 * model.cfg.n_layers
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a" in n or ".lora_b" in n for n in trainable)
    n_train, n_total = trainable_parameters(model)
    cfg = model.cfg
    per_layer = sum(4 * (i + o) for i, o in [(cfg.dim, cfg.dim), (cfg.dim, cfg.n_kv_heads * cfg.head_dim),
                                            (cfg.dim, cfg.n_kv_heads * cfg.head_dim), (cfg.dim, cfg.dim),
                                            (cfg.dim, cfg.ffn_dim), (cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim)])  # fmt: skip
    assert n_train == cfg.n_layers * per_layer and n_total > n_train
    # The base weights keep their names: a base state dict loads as is.
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)


def test_merged_weights_give_the_same_logits_as_the_adapted_model():
    model, reference, _ = lora_model(alpha=16.0)
    # float64: the merge's math, not fp32 rounding (tests/numerics.py)
    model, reference = model.double(), reference.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.05)  # as if trained
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        adapted = model(tokens)
        assert not torch.allclose(adapted, reference(tokens), atol=1e-3)
        merged = merge_lora_state(model.state_dict(), scale=16.0 / 4)
        assert not any(".lora_" in k for k in merged)
        reference.load_state_dict(merged)
        assert_same_math(reference(tokens), adapted, torch.float64, **model_terms(model.cfg, 16))


def test_gradients_reach_only_the_adapters():
    model, _, _ = lora_model(targets=("wq", "wv"))
    model.train()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    model(tokens).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if ".lora_a" in name:
            # B is zero, so A's gradient is zero at the start; B's is not.
            assert p.grad is not None
        elif ".lora_b" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None, name


def test_reinit_and_bad_targets():
    model, _, _ = lora_model(targets=("w2",))
    block = model.layers["0"].mlp.w2
    with torch.no_grad():
        block.lora_b.fill_(1.0)
    init_lora_weights(model)
    assert block.lora_b.abs().sum() == 0
    with pytest.raises(ValueError, match="unknown layer"):
        apply_lora(Llama(model_config("debug")), 4, 8.0, 0.0, ["wz"])
