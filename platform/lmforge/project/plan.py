"""What a training config will cost, before anything runs (`lmforge plan -c CONFIG`).

From the model config, the token budget and the hardware (GPU type and count, or CPU workers):
parameters, FLOPs (6 N_matmul + 12 L D T per token, see lmforge.model.llama.flops_per_token),
the compute-optimal token count (Chinchilla, ~20 tokens per parameter), memory per device under
FSDP2, and wall time / GPU-hours at an assumed MFU. Warns when the config will not fit.

Memory per device, FSDP2 over W devices, AdamW, fp32 master weights:
  sharded state   16 N / W bytes   (fp32 params 4 + grads 4 + Adam moments 8)
  gathered params one block's bf16 params, twice (the current block and the prefetched next)
  activations     per micro-batch of b sequences of T tokens (bf16, flash attention: no T^2 term):
                  without checkpointing 2 b T (10 D + 4 F) bytes per layer (block input, norms,
                  q/k/v, attention out, the four F-wide SwiGLU tensors); with checkpointing
                  2 b T D per layer plus one layer's full set during recompute
  logits          b T V x 10 bytes (bf16 logits, fp32 copy for the loss, fp32 gradient)
  overhead        +10% for the allocator, +1 GiB for the CUDA context and NCCL buffers
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmforge import storage
from lmforge.model.llama import LlamaConfig, flops_per_token, num_params
from lmforge.train.config import TrainConfig
from lmforge.train.mfu import gpu_peak_tflops

GPU_MEMORY_GIB = {
    "B200": 180,
    "H200": 141,
    "H100": 80,
    "H800": 80,
    "A100": 80,
    "L40S": 48,
    "L4": 24,
    "A10G": 24,
    "A10": 24,
}
CHINCHILLA_TOKENS_PER_PARAM = 20
GIB = 2**30


@dataclass
class Plan:
    params: int
    params_non_embedding: int
    seq_len: int
    flops_per_token: float
    tokens: int
    steps: int
    total_flops: float
    chinchilla_tokens: int
    devices: int
    device: str
    peak_tflops_per_device: float
    assumed_mfu: float
    wall_hours: float
    device_hours: float
    memory_gib: dict[str, float] = field(default_factory=dict)
    device_memory_gib: float | None = None
    warnings: list[str] = field(default_factory=list)
    seq_len_source: str = ""  # where seq_len came from: --seq-len, the data, a data config


def memory_per_device(
    arch: LlamaConfig, seq_len: int, micro_batch: int, devices: int, checkpointing: bool
) -> dict[str, float]:
    """Bytes per device in GiB by part, as in the module docstring."""
    n = num_params(arch)
    b, T, D, F, L, V = micro_batch, seq_len, arch.dim, arch.ffn_dim, arch.n_layers, arch.vocab_size
    block = (num_params(arch, embeddings=False) - D) / L
    per_layer_full = 2 * b * T * (10 * D + 4 * F)
    acts = (2 * b * T * D * L + per_layer_full) if checkpointing else per_layer_full * L
    parts = {
        "sharded_state": 16 * n / devices,
        "gathered_params": 2 * 2 * block,
        "activations": acts,
        "logits": 10 * b * T * V,
    }
    subtotal = sum(parts.values())
    parts["overhead"] = 0.1 * subtotal + GIB
    parts["total"] = subtotal + parts["overhead"]
    return {k: v / GIB for k, v in parts.items()}


def make_plan(
    cfg: TrainConfig,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    seq_len_source: str = "given",
) -> Plan:
    """The plan of `cfg`. `seq_len`/`vocab_size` (from `--seq-len` or a data config) win over
    the data output's manifest at data.path; with neither, seq_len is the model's max_seq_len
    and the plan says it assumed it."""
    manifest = read_manifest(cfg.data.path)
    if not seq_len and manifest.get("seq_len"):
        seq_len, seq_len_source = manifest["seq_len"], f"the data at {cfg.data.path}"
    arch = cfg.model.to_llama(vocab_size=vocab_size or manifest.get("vocab_size"), seq_len=seq_len)
    assumed = not seq_len
    if assumed:
        seq_len = arch.max_seq_len
        seq_len_source = "assumed: the model's max_seq_len"
    res = cfg.resources
    gpu = res.accelerator_type or cfg.plan.gpu_type
    on_gpu = res.gpus_per_worker > 0
    devices = (
        res.num_workers * max(1, math.ceil(res.gpus_per_worker)) if on_gpu else res.num_workers
    )
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    if cfg.train.precision == "auto" and not on_gpu:
        from lmforge.train.hardware import choose_precision

        bf16, _ = choose_precision("auto", "cpu", max(1, int(res.cpus_per_worker)))
    if on_gpu:
        import torch

        peak = cfg.train.peak_tflops or gpu_peak_tflops(
            gpu, torch.bfloat16 if bf16 else torch.float32
        )
        device = gpu
    else:
        peak, device = cfg.train.peak_tflops or _cpu_peak(res.cpus_per_worker, bf16), "CPU worker"
    warnings: list[str] = []
    if peak is None:
        warnings.append(f"GPU '{gpu}' is not in the peak table: set train.peak_tflops")
        peak = 1.0
    fpt = flops_per_token(arch, seq_len)
    gbt = cfg.train.global_batch_tokens
    steps = cfg.train.max_steps or max(1, (cfg.train.max_tokens or 0) // gbt)
    tokens = steps * gbt
    n = num_params(arch)
    seconds = fpt * tokens / (devices * peak * 1e12 * cfg.plan.assumed_mfu)
    memory = memory_per_device(
        arch, seq_len, cfg.train.micro_batch_size, devices, cfg.parallel.activation_checkpointing
    )
    capacity = cfg.plan.gpu_memory_gib or _gpu_memory(gpu) if on_gpu else None
    plan = Plan(
        params=n,
        params_non_embedding=num_params(arch, embeddings=False),
        seq_len=seq_len,
        flops_per_token=fpt,
        tokens=tokens,
        steps=steps,
        total_flops=fpt * tokens,
        chinchilla_tokens=CHINCHILLA_TOKENS_PER_PARAM * n,
        devices=devices,
        device=device,
        peak_tflops_per_device=peak,
        assumed_mfu=cfg.plan.assumed_mfu,
        wall_hours=seconds / 3600,
        device_hours=seconds / 3600 * devices,
        memory_gib=memory,
        device_memory_gib=capacity,
        warnings=warnings,
        seq_len_source=seq_len_source,
    )
    if assumed:
        plan.warnings.append(
            f"seq_len {seq_len} is assumed (the model's max_seq_len): data.path names no data "
            "output; give --seq-len or --data-config (the data stage's config)"
        )
    _check(plan, cfg, seq_len)
    return plan


def _check(plan: Plan, cfg: TrainConfig, seq_len: int) -> None:
    w = plan.warnings
    if plan.device_memory_gib and plan.memory_gib["total"] > plan.device_memory_gib:
        fixes = ["a smaller train.micro_batch_size", "more GPUs"]
        if not cfg.parallel.activation_checkpointing:
            fixes.insert(0, "parallel.activation_checkpointing=true")
        w.append(
            f"will not fit: ~{plan.memory_gib['total']:.1f} GiB per GPU needed, "
            f"{plan.device_memory_gib:g} GiB on a {plan.device}; try {', '.join(fixes)}"
        )
    ratio = plan.tokens / plan.chinchilla_tokens
    if ratio < 0.25:
        w.append(
            f"undertrained: {plan.tokens:,} tokens is {ratio:.2f}x the compute-optimal "
            f"{plan.chinchilla_tokens:,} (~{CHINCHILLA_TOKENS_PER_PARAM} tokens/param)"
        )
    per_step = seq_len * cfg.train.micro_batch_size * cfg.resources.num_workers
    if cfg.train.global_batch_tokens % per_step:
        w.append(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of "
            f"seq_len x micro_batch_size x num_workers = {per_step}: training will refuse it"
        )


def format_plan(plan: Plan) -> str:
    mem = plan.memory_gib
    rows = [
        (
            "parameters",
            f"{plan.params / 1e6:,.1f}M ({plan.params_non_embedding / 1e6:,.1f}M non-embedding)",
        ),
        ("sequence length", f"{plan.seq_len:,} ({plan.seq_len_source})"),
        (
            "FLOPs per token",
            f"{plan.flops_per_token / 1e9:,.3f} GFLOP (6 N_matmul + 12 L D T, T={plan.seq_len})",
        ),
        ("tokens", f"{plan.tokens:,} in {plan.steps:,} steps"),
        (
            "compute-optimal",
            f"{plan.chinchilla_tokens:,} tokens (Chinchilla, {CHINCHILLA_TOKENS_PER_PARAM}/param); this run {plan.tokens / plan.chinchilla_tokens:.2f}x",
        ),
        ("total compute", f"{plan.total_flops:.3e} FLOPs"),
        (
            "hardware",
            f"{plan.devices} x {plan.device}, peak {plan.peak_tflops_per_device:,.4g} TFLOP/s each",
        ),
        (
            "memory / device",
            f"{mem['total']:.2f} GiB = state {mem['sharded_state']:.2f} + gathered {mem['gathered_params']:.2f} + activations {mem['activations']:.2f} + logits {mem['logits']:.2f} + overhead {mem['overhead']:.2f}"
            + (f" (of {plan.device_memory_gib:g} GiB)" if plan.device_memory_gib else ""),
        ),
        ("wall time", f"{_duration(plan.wall_hours)} at {100 * plan.assumed_mfu:.0f}% MFU"),
        ("device-hours", f"{plan.device_hours:,.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def read_manifest(path: str | None) -> dict:
    if not path:
        return {}
    try:
        return storage.read_json(storage.join(path, "manifest.json"))
    except (FileNotFoundError, OSError, ValueError):
        return {}


def _gpu_memory(gpu: str) -> float | None:
    for key, gib in GPU_MEMORY_GIB.items():
        if key.lower() in gpu.lower():
            return gib
    return None


def _cpu_peak(threads: float, bf16: bool) -> float:
    import torch

    from lmforge.train.mfu import cpu_peak

    return cpu_peak(torch.bfloat16 if bf16 else torch.float32, max(1, int(threads)))[0]


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"
