"""What a parallel layout (tp, pp, cp, data parallel) costs per step, for `lmforge plan`: the
pipeline bubble, the bytes each GPU sends per step, and an estimated step time.

Memory (project/plan.py, `memory_per_device` with `dims`): a GPU holds its pipeline stage's
layers (the embedding on the first stage, the final norm and the head on the last), the blocks'
matmuls, the embedding and the head split over tp (norms replicated); FSDP shards that over
dp_shard x cp. Activations: sequence parallel divides them by tp, context parallel by cp, and
1F1B keeps pp - rank micro-batches in flight on pipeline rank `rank` (interleaved 1F1B, v = 2:
((v - 1) pp + 2 (pp - 1 - rank) + 1) / v, Megatron's pp (1 + (pp - 1) / (pp v)) on the first).
The plan reports the worst stage.

Bytes sent per GPU per step (m micro-batches of b sequences of T tokens, p bytes per element,
n the GPU's parameters: its stage's, split over tp; a ring collective over g ranks moves
(g - 1) / g of the buffer through each rank):
  fsdp   2 m p n (S-1)/S all-gathers (forward, backward) + 4 n (S-1)/S fp32 reduce-scatter per
         reduction (m of them, one with grad_reduce=last_micro_batch), S = dp_shard x cp; HSDP
         adds an all-reduce of the shard, 2 x 4 n / S (R-1)/R, per reduction across R replicas
  tp     sequence parallel: per layer 2 all-gathers and 2 reduce-scatters of the b T/cp D
         activations in forward, as many in backward (and forward again when checkpointing):
         m L_stage b (T/cp) D p (tp-1)/tp x 8 (12 with checkpointing)
  pp     each micro-batch's activation forward and its gradient back, per stage of the rank:
         m v 2 b (T/cp) D p / tp
  cp     ring attention: K and V of b T/cp tokens (2 b (T/cp) (K/tp) E p) pass cp - 1 ranks per
         layer, once in forward, twice in backward (K/V and their gradients), once more when
         checkpointing: m L_stage (cp-1) x that x 3 (4)

Step time = compute / (1 - bubble) + exposed communication, compute = FLOPs / (GPUs x peak x
MFU) (x 4/3 with checkpointing: the forward again), bubble = (pp-1) / (m+pp-1) for 1F1B,
/ v more for interleaved. TP, CP and PP transfers are on the critical path (counted whole);
FSDP's are prefetched under compute (only the excess counts). Bandwidths are assumed: intra-node
NVLink for groups within a node, the network across nodes (INTRA_NODE_BYTES_PER_S,
INTER_NODE_BYTES_PER_S).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.model.llama import LlamaConfig, num_params
from lmforge.train.layout import ParallelDims

INTRA_NODE_BYTES_PER_S = 300e9  # NVLink (H100 SXM: 450 GB/s a direction; ~2/3 achieved)
INTER_NODE_BYTES_PER_S = 40e9  # 400 Gb/s InfiniBand or RoCE per GPU, ~80% achieved
GPUS_PER_NODE = 8


def block_params(arch: LlamaConfig) -> int:
    head = 0 if arch.tie_embeddings else arch.vocab_size * arch.dim
    return (num_params(arch, embeddings=False) - arch.dim - head) // arch.n_layers


def stage_params(arch: LlamaConfig, tp: int, pp: int, rank: int) -> tuple[int, int, int]:
    """(layers, one block's, the root's) parameters on one GPU of pipeline rank `rank`: the
    blocks' matmuls, the embedding and the head split over tp (norms replicated); the embedding
    on the first stage, the final norm and the head on the last (a tied head is a second copy
    there when pp > 1)."""
    D, V = arch.dim, arch.vocab_size
    block = block_params(arch)
    block_gpu = (block - 2 * D) // tp + 2 * D
    head = V * D if (not arch.tie_embeddings or pp > 1) else 0
    root = (V * D // tp if rank == 0 else 0) + (D + head // tp if rank == pp - 1 else 0)
    return arch.n_layers // pp, block_gpu, root


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "interleaved_1f1b" else 1


def bubble_fraction(pp: int, micro_batches: int, schedule: str) -> float:
    """The share of a step a pipeline rank idles: (pp-1) / (m+pp-1) for 1F1B, / v interleaved."""
    if pp == 1:
        return 0.0
    return (pp - 1) / (micro_batches + pp - 1) / stages_per_rank(schedule)


@dataclass(frozen=True)
class Step:
    """One step's shape on one data-parallel rank: m micro-batches of b sequences of T tokens."""

    seq_len: int
    micro_batch: int
    micro_batches: int
    compute_bytes: int = 2
    checkpointing: bool = False
    grad_reduce: str = "every_micro_batch"
    schedule: str = "1f1b"


def communication_bytes(
    arch: LlamaConfig, dims: ParallelDims, step: Step, params: int, layers: int
) -> dict[str, float]:
    """Bytes one GPU sends per step, by kind (the module docstring); `params` and `layers` are
    the GPU's (its stage's, split over tp)."""
    m, b, p = step.micro_batches, step.micro_batch, step.compute_bytes
    tokens = b * step.seq_len // dims.cp  # per micro-batch on this GPU
    S, R, tp, cp = dims.dp_shard * dims.cp, dims.dp_replicate, dims.tp, dims.cp
    reductions = m if step.grad_reduce == "every_micro_batch" else 1
    fsdp = (2 * m * p + reductions * 4) * params * (S - 1) / S
    fsdp += reductions * 2 * 4 * params / S * (R - 1) / R
    tp_bytes = (
        m * layers * tokens * arch.dim * p * (tp - 1) / tp * (12 if step.checkpointing else 8)
    )
    pp_bytes = (
        m * stages_per_rank(step.schedule) * 2 * tokens * arch.dim * p / tp if dims.pp > 1 else 0
    )
    kv = 2 * tokens * (arch.n_kv_heads // tp) * arch.head_dim * p
    cp_bytes = m * layers * (cp - 1) * kv * (4 if step.checkpointing else 3)
    return {"fsdp": fsdp, "tp": tp_bytes, "pp": pp_bytes, "cp": cp_bytes}


def step_seconds(
    compute_s: float,
    comm: dict[str, float],
    dims: ParallelDims,
    step: Step,
    gpus_per_node: int = GPUS_PER_NODE,
) -> dict[str, float]:
    """Seconds of one step by part: compute (with the bubble) and the exposed communication."""

    def rate(span: int) -> float:  # a group of consecutive ranks `span` wide
        return INTRA_NODE_BYTES_PER_S if span <= gpus_per_node else INTER_NODE_BYTES_PER_S

    if step.checkpointing:
        compute_s *= 4 / 3
    bubble = bubble_fraction(dims.pp, step.micro_batches, step.schedule)
    inner = dims.tp * dims.cp
    fsdp_s = comm["fsdp"] / rate(dims.dp_shard * inner)
    parts = {
        "compute": compute_s,
        "bubble": compute_s / (1 - bubble) - compute_s,
        "tp": comm["tp"] / rate(dims.tp),
        "cp": comm["cp"] / rate(inner),
        "pp": comm["pp"] / rate(dims.world),
        "fsdp_exposed": max(0.0, fsdp_s - compute_s),
    }
    parts["total"] = sum(parts.values())
    return parts


def layout_numbers(arch: LlamaConfig, dims: ParallelDims, step: Step) -> dict:
    """The layout, its bubble and the GiB each GPU sends per step (of its busiest stage)."""
    stages = [stage_params(arch, dims.tp, dims.pp, rank) for rank in range(dims.pp)]
    layers, block, _ = stages[0]
    params = max(layers * block + root for _, _, root in stages)
    comm = communication_bytes(arch, dims, step, params, layers)
    return {
        "tp": dims.tp,
        "pp": dims.pp,
        "cp": dims.cp,
        "dp_shard": dims.dp_shard,
        "dp_replicate": dims.dp_replicate,
        "pp_schedule": step.schedule,
        "micro_batches": step.micro_batches,
        "bubble": bubble_fraction(dims.pp, step.micro_batches, step.schedule),
        "communication_gib": {k: v / 2**30 for k, v in comm.items()},
    }


def format_layout(layout: dict) -> list[tuple[str, str]]:
    """The plan table's rows for the layout."""
    dims = " x ".join(f"{k} {layout[k]}" for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp"))
    pipeline = (
        f"; {layout['pp_schedule']}, {layout['micro_batches']} micro-batches, bubble "
        f"{100 * layout['bubble']:.1f}%"
        if layout["pp"] > 1
        else ""
    )
    comm = layout["communication_gib"]
    sent = " + ".join(f"{k} {v:.2f}" for k, v in comm.items() if v)
    return [
        ("layout", dims + pipeline),
        ("sent per step", f"{sum(comm.values()):.2f} GiB" + (f" = {sent}" if sent else "")),
    ]
