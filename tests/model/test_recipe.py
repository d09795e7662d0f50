"""The recipe options each change the forward exactly as specified, everywhere the model runs
(training forward, KV-cached decoding), and an HF export refuses what HF Llama cannot hold."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge import LmforgeError
from lmforge.model.generate import forward
from lmforge.model.hf import check_hf_representable
from lmforge.model.kvcache import KVCache
from lmforge.model.llama import Llama, LlamaConfig, num_params
from tests.numerics import assert_same_math, model_terms, tolerance

BASE = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


def built(**options) -> tuple[LlamaConfig, Llama]:
    cfg = LlamaConfig(**{**BASE, **options})
    torch.manual_seed(0)
    return cfg, Llama(cfg).double().eval()


def test_qk_norm_gives_queries_and_keys_unit_rms_per_head_before_rope(monkeypatch):
    # eps would pull the rms of the small initial activations below 1: make it negligible.
    cfg, model = built(qk_norm=True, norm_eps=1e-30)
    tol = tolerance(torch.float64, terms=cfg.head_dim, magnitude=2.0)
    seen = []
    import lmforge.model.llama as llama

    real = llama.apply_rope
    monkeypatch.setattr(llama, "apply_rope", lambda x, *a: seen.append(x) or real(x, *a))
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 7)))
    q, k = seen[0], seen[1]  # layer 0: (B, T, H, E), (B, T, K, E), weights still ones
    assert q.shape == (2, 7, 4, 8) and k.shape == (2, 7, 2, 8)
    for t in (q, k):
        rms = t.pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=tol, rtol=0)
    # The norm's weight scales each of the E dims: a weight of 2 doubles the rms.
    model.layers["0"].attn.q_norm.weight.data.fill_(2.0)
    seen.clear()
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 7)))
    rms = seen[0].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 2.0), atol=tol, rtol=0)
    # E-wide weights for q and k per layer: counted by num_params.
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    assert num_params(cfg) - num_params(LlamaConfig(**BASE, norm_eps=1e-30)) == 2 * 2 * 8


def test_softcap_bounds_the_logits_and_is_cap_tanh_of_the_uncapped():
    _, plain = built()
    cfg, capped = built(logit_softcap=0.05)
    capped.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        raw, got = plain(tokens), capped(tokens)
    assert raw.abs().max() > 0.05  # the cap is active on this input
    assert got.abs().max() <= 0.05
    assert_same_math(got, 0.05 * torch.tanh(raw / 0.05), torch.float64, **model_terms(cfg, 9))


def test_relu2_mlp_is_w2_of_relu_squared_and_has_no_w3():
    cfg, model = built(mlp="relu2", ffn_dim=96)
    mlp = model.layers["0"].mlp
    assert mlp.w3 is None
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        want = F.relu(x @ mlp.w1.weight.T).pow(2) @ mlp.w2.weight.T
        assert_same_math(mlp(x), want, torch.float64, terms=96, depth=2)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="mlp 'gelu' is not one of swiglu, relu2"):
        LlamaConfig(**BASE, mlp="gelu")


def test_zero_init_outputs_make_the_model_embedding_norm_head_at_init():
    cfg, model = built(zero_init_out=True, tie_embeddings=False)
    for block in model.layers.values():
        assert not block.attn.wo.weight.any() and not block.mlp.w2.weight.any()
        assert block.attn.wq.weight.std() > 0.01  # the inputs are not zeroed
    tokens = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        want = model.output(model.norm(model.tok_embeddings(tokens)))
        assert torch.equal(model(tokens), want)  # each block adds exactly zero


def test_kv_cached_decoding_equals_the_full_forward_with_every_option_on():
    cfg, model = built(qk_norm=True, logit_softcap=3.0, mlp="relu2", zero_init_out=False)
    torch.manual_seed(1)
    prompt = torch.randint(0, 96, (12,)).tolist()
    cache = KVCache(cfg, slots=2, dtype=torch.float64)
    # Prefill 5 tokens, then decode the other 7 one at a time, each against the full forward.
    got = [forward(model, cache, [0], [prompt[:5]], [0])[0]]
    for i in range(5, 12):
        got.append(forward(model, cache, [0], [prompt[i : i + 1]], [i])[0])
    got = torch.cat(got)  # (12, V)
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0].float()
    assert got.abs().max() <= 3.0
    assert_same_math(got, want, torch.float64, **model_terms(cfg, 12), stored_as=torch.float32)


def test_the_options_travel_in_config_json_and_hf_export_refuses_them(tmp_path):
    cfg = LlamaConfig(**BASE, qk_norm=True, mlp="relu2", logit_softcap=30.0, zero_init_out=True)
    assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(LmforgeError) as e:
        check_hf_representable(cfg, "art")
    message = str(e.value)
    assert "\n" not in message
    assert "model.qk_norm, model.logit_softcap, model.mlp cannot be represented" in message
    # zero-init changes only the initial weights: HF Llama holds the trained model.
    check_hf_representable(LlamaConfig(**BASE, zero_init_out=True, tie_embeddings=False), "art")


def test_the_race_anchor_imports_no_lmforge_code():
    """bench/anchor.py is the race's outside baseline: torch, numpy and pyarrow only."""
    import ast
    from pathlib import Path

    source = (Path(__file__).parents[2] / "bench" / "anchor.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported == {"__future__", "argparse", "glob", "json", "math", "os", "time", "numpy",
                        "pyarrow", "torch"}  # fmt: skip
    assert len(source.splitlines()) <= 160
