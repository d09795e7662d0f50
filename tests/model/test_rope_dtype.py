"""The rotary position table is fp32 (complex64) on every path: whatever dtype the weights are
cast to (`.to(bfloat16)` as the serving engine does, FSDP2's mixed precision in training), and
after a meta-device build. bf16 cos/sin would move every rotated query and key by up to one
bf16 unit, differently in serving and in training."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.artifact import load_model, save_artifact
from lmforge.model.llama import Llama, LlamaConfig, rope_table
from lmforge.train.parallelize import build_model


def cfg(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512
    )
    return LlamaConfig(**{**base, **kw})


def bf16_weights(model: Llama) -> Llama:
    """Weights rounded to bf16 and nothing else: what FSDP2's param_dtype=bf16 computes with."""
    for p in model.parameters():
        p.data = p.data.bfloat16()
    return model


def with_bf16_table(model: Llama) -> Llama:
    """The defect: cos and sin rounded to bf16."""
    t = model.rope
    model._buffers["rope"] = torch.complex(t.real.bfloat16().float(), t.imag.bfloat16().float())
    return model


@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.to(torch.bfloat16),
        lambda m: m.bfloat16(),
        lambda m: m.half(),
        lambda m: m.to(dtype=torch.float16),
        lambda m: m.double(),
        lambda m: m.to("cpu", torch.bfloat16),
    ],
)
def test_the_position_table_stays_complex64_under_every_cast(cast):
    c = cfg()
    model = cast(Llama(c))
    assert model.rope.dtype == torch.complex64
    assert torch.equal(model.rope, rope_table(c.head_dim, c.max_seq_len, c.rope_theta))
    assert model.output.weight is model.tok_embeddings.weight  # still tied


def test_a_bf16_cast_model_rotates_with_fp32_angles():
    """`.to(bfloat16)` computes exactly what bf16 weights with the fp32 table compute (the same
    ops in the same order, so bit for bit), and not what a bf16 table computes."""
    torch.manual_seed(0)
    model = Llama(cfg())
    reference = bf16_weights(Llama(cfg()))
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 128, (2, 500))
    with torch.no_grad():
        cast = model.to(torch.bfloat16)(tokens)
        want = reference(tokens)
        rounded = with_bf16_table(reference)(tokens)
    assert cast.dtype == torch.bfloat16
    assert torch.equal(cast, want)
    assert not torch.equal(rounded, want)  # the check can see a bf16 table


@pytest.mark.parametrize("tie", [True, False])
def test_meta_init_on_one_worker_initialises_every_weight_and_ties_the_head(tie):
    c = cfg(tie_embeddings=tie, vocab_size=512)
    model = build_model(c, torch.device("cpu"), seed=3, fsdp=False, meta_init=True)
    assert model.rope.dtype == torch.complex64 and model.rope.device.type == "cpu"
    assert torch.equal(model.rope, rope_table(c.head_dim, c.max_seq_len, c.rope_theta))
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    assert len(list(model.parameters())) == len(model.state_dict()) - tie
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
    if not tie:
        # init_weights: trunc-normal(0, D^-1/2) cut at 3 std (std x 0.987); 32k samples give
        # the std to ~0.4%, so 5% is many standard errors yet far below uninitialised memory.
        head_std = c.dim**-0.5 * 0.987
        w = model.output.weight.detach()
        assert w.abs().max() <= 3 * c.dim**-0.5
        assert abs(w.std().item() / head_std - 1) < 0.05
    # Tied or not, a step's gradient reaches the head through the embedding when tied.
    logits = model(torch.randint(0, c.vocab_size, (2, 16)))
    logits.float().square().mean().backward()
    assert model.output.weight.grad is not None
    assert tie == (model.tok_embeddings.weight.grad is model.output.weight.grad)


def test_engine_logits_equal_the_training_models_at_the_same_dtype_policy(tmp_path):
    """Serving casts the artifact with `.to(bfloat16)`; training under FSDP2 computes with bf16
    weights and the fp32 table. The two give the same logits, bit for bit."""
    from lmforge.serve.config import ServeArgs
    from lmforge.serve.engine import load_engine
    from tests.serve.conftest import make_artifact

    artifact = make_artifact(tmp_path / "model", max_seq_len=256)
    engine = load_engine(
        ServeArgs(
            models=[{"name": "m", "artifact": artifact, "dtype": "bfloat16", "device": "cpu"}]
        ).models[0]
    )
    training = bf16_weights(load_model(artifact))
    tokens = torch.randint(0, training.cfg.vocab_size, (2, 200))
    with torch.no_grad():
        served, trained = engine.model(tokens), training(tokens)
    assert engine.model.rope.dtype == torch.complex64
    assert served.dtype == trained.dtype == torch.bfloat16
    assert torch.equal(served, trained)


def test_a_checkpoint_round_trip_rebuilds_the_fp32_table(tmp_path):
    c = cfg()
    save_artifact(str(tmp_path / "m"), Llama(c).state_dict(), c)
    model = load_model(str(tmp_path / "m")).to(torch.float16)
    assert torch.equal(model.rope, rope_table(c.head_dim, c.max_seq_len, c.rope_theta))
