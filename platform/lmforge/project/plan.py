"""What a training config will cost, before anything runs (`lmforge plan -c CONFIG`).

From the model config, the token budget and the hardware (GPU type and count, or CPU workers):
parameters, FLOPs (6 N_matmul + 12 L D T per token, see lmforge.model.llama.flops_per_token),
the compute-optimal token count (Chinchilla, ~20 tokens per parameter), memory per device under
FSDP2, and wall time / GPU-hours at an assumed MFU. Warns when the config will not fit.

Memory per device, AdamW, fp32 master weights, N parameters (N_t of them trainable: all, or
the LoRA adapters), sharded by FSDP2 over W devices; p = 2 bytes for bf16 compute, 4 for fp32.
Every term is a buffer the run holds; the total adds them all (an upper bound: some never
coexist, e.g. the logits and the root's gradient buffers):
  params          4 N / W          fp32 master weights (sharded)
  grads           4 N_t / W        fp32 gradients (sharded)
  optimizer       8 N_t / W + 4 per trainable tensor (AdamW's two fp32 moments and its step)
  unsharded_grads 4 N_t            parallel.grad_reduce=last_micro_batch with accumulation: each
                                   worker keeps a full fp32 gradient until the last micro-batch
  compute_copy    FSDP2: p x (2 blocks: the current one and the prefetched next, + the root
                  (embeddings, final norm, head), which stays gathered from forward to
                  backward); one worker without FSDP in bf16: autocast's p x N weight casts
  grad_buffers    FSDP2: one block's and the root's unsharded gradients, in p and in the fp32
                  copy the reduce-scatter sends
  activations     per micro-batch of b sequences of T tokens (flash attention: no T^2 term):
                  without checkpointing b T (p (10 D + 4 F) + n) per layer (block input,
                  norms, q/k/v, attention out, the four F-wide SwiGLU tensors; n = 8 D for
                  the two RMSNorms' fp32 working copies when p < 4); with checkpointing
                  p b T D per layer plus one layer's full set during recompute; and the final
                  norm's b T (p + n / 2) D (the tensors autograd saves in the forward equal
                  this within 15% on CPU: tests/train/test_plan_memory.py)
  logits          b T V x (p + 4 + 4 + p): the head's logits, their fp32 copy the loss keeps
                  (log-softmax), its fp32 gradient and that gradient cast back for the head
  cuda_and_nccl   on GPU: 1 GiB for the CUDA context, +1 GiB for NCCL buffers with W > 1
  fragmentation   +10% of everything above, for the caching allocator
With parallel.tp/pp/cp each term is the worst pipeline stage's, divided as project/layouts.py
says; the plan adds the layout's bubble and bytes sent, and `--suggest` (project/suggest.py)
ranks every layout that fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmforge import storage
from lmforge.model.llama import LlamaConfig, flops_per_token, num_params
from lmforge.project.layouts import Step, block_params, format_layout, layout_numbers, stage_params
from lmforge.train.config import PlanConfig, TrainConfig
from lmforge.train.layout import ParallelDims, check_parallel_layout, parallel_dims
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
    layout: dict = field(default_factory=dict)  # degrees, bubble, bytes sent (layouts.py)


@dataclass(frozen=True)
class Trainable:
    """What trains: every weight, or LoRA adapters on a frozen model."""

    params: int  # parameters with a gradient and optimizer state
    tensors: int  # how many tensors hold them (AdamW keeps a step per tensor)
    per_block: int  # of them in one transformer block
    in_root: int  # of them in the root (embeddings, final norm, head)


def full_training(arch: LlamaConfig) -> Trainable:
    n, block = num_params(arch), block_params(arch)
    # per block: wq wk wv wo w1 w2 w3 and two norms; root: embedding, final norm, untied head
    tensors = 9 * arch.n_layers + 2 + (0 if arch.tie_embeddings else 1)
    return Trainable(n, tensors, block, n - arch.n_layers * block)


def lora_training(arch: LlamaConfig, rank: int, targets: list[str]) -> Trainable:
    """LoRA adapters: r x (in + out) per targeted linear layer per block, two tensors each."""
    D, F, E = arch.dim, arch.ffn_dim, arch.head_dim
    shapes = {
        "wq": (D, arch.n_heads * E),
        "wk": (D, arch.n_kv_heads * E),
        "wv": (D, arch.n_kv_heads * E),
        "wo": (arch.n_heads * E, D),
        "w1": (D, F),
        "w3": (D, F),
        "w2": (F, D),
    }
    per_block = sum(rank * sum(shapes[t]) for t in targets)
    return Trainable(per_block * arch.n_layers, 2 * len(targets) * arch.n_layers, per_block, 0)


def memory_per_device(
    arch: LlamaConfig,
    seq_len: int,
    micro_batch: int,
    devices: int,
    checkpointing: bool,
    *,
    compute_bytes: int = 2,
    fsdp: bool = True,
    accumulation: int = 1,
    grad_reduce: str = "every_micro_batch",
    trainable: Trainable | None = None,
    on_gpu: bool = True,
    dims: ParallelDims | None = None,
    schedule: str = "1f1b",
) -> dict[str, float]:
    """GiB per device by part, as in the module docstring (`total` sums them). With `dims`
    (tp/pp/cp), the worst pipeline stage's (project/layouts.py says how each term divides)."""
    dims = dims or ParallelDims(dp_shard=devices)
    step = Step(seq_len, micro_batch, accumulation, compute_bytes, checkpointing, grad_reduce,
                schedule)  # fmt: skip
    t = trainable or full_training(arch)
    ranks = [_stage_memory(arch, step, dims, rank, t, fsdp, on_gpu) for rank in range(dims.pp)]
    return max(ranks, key=lambda parts: parts["total"])


def _stage_memory(
    arch: LlamaConfig, step: Step, dims: ParallelDims, rank: int, t: Trainable, fsdp: bool,
    on_gpu: bool,
) -> dict[str, float]:  # fmt: skip
    T, b, p, checkpointing = step.seq_len, step.micro_batch, step.compute_bytes, step.checkpointing
    D, F, V, tp = arch.dim, arch.ffn_dim, arch.vocab_size, dims.tp
    layers, block, root = stage_params(arch, tp, dims.pp, rank)
    n, last = layers * block + root, rank == dims.pp - 1
    if t.in_root:  # full training: every weight on this GPU trains
        tr, tr_block, tr_root = n, block, root
        head = not arch.tie_embeddings or dims.pp > 1
        tensors = 9 * layers + (rank == 0) + ((1 + head) if last else 0)
    else:  # LoRA adapters, split over tp with their layer
        tr, tr_block, tr_root = layers * t.per_block / tp, t.per_block / tp, 0
        tensors = t.tensors * layers // arch.n_layers
    S = dims.dp_shard * dims.cp  # FSDP shards over the data and context parallel ranks
    T = T // dims.cp  # each context-parallel rank holds 1/cp of every sequence
    norm32 = 8 * D if p < 4 else 0  # RMSNorm computes in fp32 whatever the activations' dtype
    per_layer_full = b * T * (p * (10 * D + 4 * F) + norm32) / tp  # sequence parallel: / tp
    final_norm = b * T * (p * D + norm32 // 2) / tp if last else 0
    # bf16 gradients are cast to fp32 for the reduce-scatter: both exist for a moment
    grad_bytes = p + 4 if p < 4 else 4
    if fsdp:
        compute_copy = p * (2 * block + root)
        grad_buffers = grad_bytes * (tr_block + tr_root)
    else:
        compute_copy = p * n if p < 4 else 0  # autocast caches one cast of each weight
        grad_buffers = 0
    in_flight = min(step.micro_batches, micro_batches_in_flight(dims.pp, rank, step.schedule))
    saved = p * b * T * D / tp * layers * in_flight + per_layer_full
    parts = {
        "params": 4 * n / S,
        "grads": 4 * tr / S,
        "optimizer": 8 * tr / S + 4 * tensors,
        "unsharded_grads": (
            4 * tr
            if fsdp and step.micro_batches > 1 and step.grad_reduce == "last_micro_batch"
            else 0
        ),
        "compute_copy": compute_copy,
        "grad_buffers": grad_buffers,
        "activations": final_norm
        + (saved if checkpointing else per_layer_full * layers * in_flight),
        "logits": b * T * V * ((2 * p + 8) if p < 4 else 12) / tp if last else 0,
        "cuda_and_nccl": (GIB + (GIB if dims.world > 1 else 0)) if on_gpu else 0,
    }
    subtotal = sum(parts.values())
    parts["fragmentation"] = 0.1 * subtotal
    parts["total"] = subtotal + parts["fragmentation"]
    return {k: v / GIB for k, v in parts.items()}


def micro_batches_in_flight(pp: int, rank: int, schedule: str) -> float:
    """Micro-batches whose activations pipeline rank `rank` holds at once, in units of its
    layers: 1F1B runs pp - rank forwards before its first backward; interleaved 1F1B (v = 2
    stages per rank) (v - 1) pp + 2 (pp - 1 - rank) + 1 forwards of 1/v of its layers."""
    if pp == 1:
        return 1
    if schedule == "1f1b":
        return pp - rank
    v = 2
    return ((v - 1) * pp + 2 * (pp - 1 - rank) + 1) / v


def make_plan(
    cfg: TrainConfig,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    seq_len_source: str = "given",
    arch: LlamaConfig | None = None,
) -> Plan:
    """The plan of `cfg`, a training or a fine-tuning config (whose architecture is `arch`, the
    base model's). `seq_len`/`vocab_size` (from `--seq-len` or a data config) win over the data
    output's manifest at data.path; with neither, seq_len is the model's max_seq_len (a
    fine-tuning config's data.seq_len) and the plan says it assumed it."""
    lora = getattr(cfg, "lora", None)
    if lora is not None and not seq_len:  # fine-tuning: its data section states seq_len
        seq_len, seq_len_source = cfg.data.seq_len, "the config's data.seq_len"
    manifest = read_manifest(getattr(cfg.data, "path", None))
    if not seq_len and manifest.get("seq_len"):
        seq_len, seq_len_source = manifest["seq_len"], f"the data at {cfg.data.path}"
    if arch is None:
        vocab = vocab_size or manifest.get("vocab_size")
        arch = cfg.model.to_llama(vocab_size=vocab, seq_len=seq_len)
    assumed = not seq_len
    if assumed:
        seq_len = arch.max_seq_len
        seq_len_source = "assumed: the model's max_seq_len"
    res = cfg.resources
    assume = getattr(cfg, "plan", None) or PlanConfig()  # a fine-tuning config has no plan section
    gpu = res.accelerator_type or assume.gpu_type
    on_gpu = res.gpus_per_worker > 0
    devices = (
        res.num_workers * max(1, math.ceil(res.gpus_per_worker)) if on_gpu else res.num_workers
    )
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    if cfg.train.precision == "auto" and not on_gpu:
        from lmforge.train.hardware import choose_precision

        bf16, _ = choose_precision("auto", "cpu", res.threads_per_worker)
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
    seconds = fpt * tokens / (devices * peak * 1e12 * assume.assumed_mfu)
    mb = cfg.train.micro_batch_size
    par = cfg.parallel
    check_parallel_layout(par, devices, arch, seq_len)  # one line naming what does not divide
    dims = parallel_dims(par, devices) if par.model_parallel > 1 else ParallelDims(dp_shard=devices)
    step = Step(seq_len, mb, max(1, gbt // (seq_len * mb * dims.dp)), 2 if bf16 else 4,
                par.activation_checkpointing, par.grad_reduce, par.pp_schedule)  # fmt: skip
    trainable = (
        lora_training(arch, lora.rank, list(lora.targets))
        if lora is not None and lora.enabled
        else full_training(arch)
    )
    memory = memory_per_device(
        arch,
        seq_len,
        mb,
        devices,
        par.activation_checkpointing,
        compute_bytes=step.compute_bytes,
        fsdp=par.fsdp,
        accumulation=step.micro_batches,
        grad_reduce=par.grad_reduce,
        trainable=trainable,
        on_gpu=on_gpu,
        dims=dims,
        schedule=par.pp_schedule,
    )
    capacity = assume.gpu_memory_gib or _gpu_memory(gpu) if on_gpu else None
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
        assumed_mfu=assume.assumed_mfu,
        wall_hours=seconds / 3600,
        device_hours=seconds / 3600 * devices,
        memory_gib=memory,
        device_memory_gib=capacity,
        warnings=warnings,
        seq_len_source=seq_len_source,
        layout=layout_numbers(arch, dims, step),
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
        if plan.memory_gib["unsharded_grads"]:
            fixes.insert(0, "parallel.grad_reduce=every_micro_batch")
        w.append(
            f"will not fit: ~{plan.memory_gib['total']:.1f} GiB per GPU needed, "
            f"{plan.device_memory_gib:g} GiB on a {plan.device}; try {', '.join(fixes)}"
        )
    ratio = plan.tokens / plan.chinchilla_tokens
    if ratio < 0.25 and not hasattr(cfg, "lora"):  # compute-optimal is a pretraining notion
        w.append(
            f"undertrained: {plan.tokens:,} tokens is {ratio:.2f}x the compute-optimal "
            f"{plan.chinchilla_tokens:,} (~{CHINCHILLA_TOKENS_PER_PARAM} tokens/param)"
        )
    dp = plan.layout["dp_shard"] * plan.layout["dp_replicate"]
    per_step = seq_len * cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_tokens % per_step:
        w.append(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of "
            f"seq_len x micro_batch_size x data-parallel workers = {per_step}: training will "
            "refuse it"
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
            f"{mem['total']:.2f} GiB"
            + (f" (of {plan.device_memory_gib:g} GiB)" if plan.device_memory_gib else "")
            + " = "
            + " + ".join(f"{k} {v:.2f}" for k, v in mem.items() if k != "total" and v),
        ),
        *format_layout(plan.layout),
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
