"""MFU counts what is executed: the FLOPs of full and LoRA training, and the peak of the math
mode the matmuls really run in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge.model.llama import Llama, LlamaConfig, cross_entropy, flops_per_token
from lmforge.model.lora import apply_lora
from lmforge.train import mfu
from lmforge.train.mfu import gpu_peak_tflops, training_flops_per_token

CFG = LlamaConfig(
    vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=32
)
T = 32


def executed_flops(cfg: LlamaConfig, lora) -> float:
    """FLOPs per token of one forward + backward as torch's FlopCounterMode sees them run.
    Attention runs on the math backend: its score matmuls are then plain batched matmuls the
    counter sees (the fused CPU kernel it does not), over the full T x T square as MFU counts."""
    torch.manual_seed(0)
    model = Llama(cfg)
    if lora is not None:
        apply_lora(model, lora.rank, 16.0, 0.0, lora.targets)  # freezes all but the adapters
    tokens = torch.randint(0, cfg.vocab_size, (2, T + 1))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    return counter.get_total_flops() / (2 * T)


ATTENTION = 12.0 * CFG.n_layers * CFG.dim * T


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize(
    "targets",
    [
        None,
        ["wq", "wk", "wv", "wo"],
        ["wo", "w2"],
        ["w1"],
        ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
    ],
)
def test_training_flops_equal_the_matmuls_torch_executes(tie, targets):
    cfg = LlamaConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    lora = None if targets is None else SimpleNamespace(rank=4, targets=targets)
    assert training_flops_per_token(cfg, T, lora) == executed_flops(cfg, lora)


def test_lora_counts_four_per_frozen_weight_and_six_per_adapter_weight():
    """By hand for the debug shapes: not the 6 N of full training. With wk frozen in block 0,
    the math backend would skip dK there; the fused kernels a GPU runs (flash, cuDNN) compute
    dq, dk and dv together, so attention counts 12 L D T once any of them needs a gradient."""
    lora = SimpleNamespace(rank=4, targets=["wq", "wv"])
    D, L, V, F_, kv = CFG.dim, CFG.n_layers, CFG.vocab_size, CFG.ffn_dim, 2 * 16
    block = D * D + D * kv * 2 + D * D + 3 * D * F_  # wq, wk, wv, wo, w1, w2, w3
    frozen = L * block + V * D  # + the head
    first_inputs = D * D + 2 * D * kv  # block 0's wq, wk, wv: no input gradient needed
    adapters = L * 4 * ((D + D) + (D + kv))
    adapter_a_skip = 4 * D * 2  # block 0's A of wq and wv: weight gradient only
    want = 4 * frozen - 2 * first_inputs + 6 * adapters - 2 * adapter_a_skip + ATTENTION
    got = training_flops_per_token(CFG, T, lora)
    assert got == want
    assert got < 0.7 * flops_per_token(CFG, T)
    assert training_flops_per_token(CFG, T, None) == flops_per_token(CFG, T)


H100 = "NVIDIA H100 80GB HBM3"


def test_the_gpu_peak_follows_the_math_mode():
    assert gpu_peak_tflops(H100, torch.bfloat16) == 989.0
    assert gpu_peak_tflops(H100, torch.float16) == 989.0
    assert gpu_peak_tflops(H100, torch.float32, tf32=True) == 989.0 / 2
    assert gpu_peak_tflops(H100, torch.float32, tf32=False) == 67.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=False) == 19.5
    assert gpu_peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert gpu_peak_tflops("Some Future GPU", torch.bfloat16) is None
    # None: as torch is set now. The loop leaves torch's default (TF32 off).
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not mfu.tf32_enabled()
        assert gpu_peak_tflops(H100, torch.float32) == 67.0
        torch.set_float32_matmul_precision("high")  # the other way to turn TF32 on
        assert mfu.tf32_enabled()
        assert gpu_peak_tflops(H100, torch.float32) == 989.0 / 2
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = before


def test_the_loop_does_not_turn_tf32_on(packed_data, tmp_path):
    from lmforge.train.config import TrainConfig
    from lmforge.train.loop import run_local
    from tests.train.conftest import tiny_train_config

    before = torch.backends.cuda.matmul.allow_tf32
    cfg = tiny_train_config(
        packed_data, tmp_path, resources={"num_workers": 1}, parallel={"fsdp": False},
        train={"max_steps": 1, "eval_every": 0}, checkpoint={"every_steps": 0},
    )  # fmt: skip
    run_local(TrainConfig.model_validate(cfg), str(tmp_path / "run"))
    assert torch.backends.cuda.matmul.allow_tf32 is before is False


def test_mfu_is_never_over_one(monkeypatch):
    assert mfu.mfu(1000.0, 1e9, 1.0) == pytest.approx(1.0)
    monkeypatch.setenv("LMFORGE_STRICT_MFU", "0")
    with pytest.warns(UserWarning, match="over 100%"):
        assert mfu.mfu(1001.0, 1e9, 1.0) is None
    monkeypatch.setenv("LMFORGE_STRICT_MFU", "1")
    with pytest.raises(mfu.MfuAboveOne):
        mfu.mfu(1001.0, 1e9, 1.0)
