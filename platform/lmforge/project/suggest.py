"""`lmforge plan --suggest`: the fastest parallel layout that fits, for a model and a GPU count.

Every (tp, cp, pp, pipeline schedule, micro-batch size, activation checkpointing) that the
divisibility rules allow (`check_parallel_layout`: heads, KV heads, FFN width, layers, seq_len;
tp x cp within a node; a whole number of micro-batches per step, at least pp of them) is planned
by the plan's memory model (its worst pipeline stage) and step-time estimate (project/layouts.py);
those that fit the GPU's memory are ranked by estimated step time, then by bytes sent, then by
memory; the table marks the chosen layout `*` and, when it is not FSDP alone, the best layout of
FSDP alone `F`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge import LmforgeError
from lmforge.model.llama import LlamaConfig, flops_per_token
from lmforge.project.layouts import (
    GPUS_PER_NODE,
    Step,
    communication_bytes,
    stage_params,
    step_seconds,
)
from lmforge.project.plan import memory_per_device
from lmforge.train.layout import ParallelConfig, check_parallel_layout, parallel_dims

MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Hardware:
    gpus: int
    memory_gib: float
    peak_tflops: float
    mfu: float
    gpus_per_node: int = GPUS_PER_NODE


@dataclass(frozen=True)
class Candidate:
    parallel: ParallelConfig
    micro_batch: int
    micro_batches: int
    memory_gib: float
    step_s: dict[str, float]
    sent_gib: float

    def row(self) -> str:
        par, s = self.parallel, self.step_s
        comm = s["total"] - s["compute"] - s["bubble"]
        schedule = par.pp_schedule if par.pp > 1 else "-"
        ac = "yes" if par.activation_checkpointing else "no"
        return (
            f"{par.tp:>2} {par.pp:>2} {par.cp:>2}  {schedule:<16} {self.micro_batch:>2} x "
            f"{self.micro_batches:<4} {ac:<3} {self.memory_gib:7.1f} {s['total']:8.2f} "
            f"{s['bubble']:6.2f} {comm:6.2f} {self.sent_gib:8.1f}"
        )


ROW_HEADER = "  tp pp cp  schedule         mb x m    ac  GiB/GPU   s/step bubble   comm GiB sent"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(
    arch: LlamaConfig,
    seq_len: int,
    global_batch_tokens: int,
    hw: Hardware,
    grad_reduce: str = "every_micro_batch",
) -> list[Candidate]:
    """Every valid layout, planned (memory of its worst stage, step time); unsorted."""
    out = []
    compute_s = (
        flops_per_token(arch, seq_len)
        * global_batch_tokens
        / (hw.gpus * hw.peak_tflops * 1e12 * hw.mfu)
    )
    for tp in _divisors(hw.gpus):
        for cp in _divisors(hw.gpus // tp):
            if hw.gpus_per_node % (tp * cp) or (cp > 1 and seq_len % (2 * cp)):
                continue
            for pp in _divisors(hw.gpus // (tp * cp)):
                for schedule in ("1f1b", "interleaved_1f1b") if pp > 1 else ("1f1b",):
                    for ac in (False, True):
                        par = ParallelConfig(tp=tp, pp=pp, cp=cp, pp_schedule=schedule,
                                             activation_checkpointing=ac, grad_reduce=grad_reduce)  # fmt: skip
                        try:
                            check_parallel_layout(par, hw.gpus, arch, seq_len)
                        except LmforgeError:
                            continue
                        dims = parallel_dims(par, hw.gpus, hw.gpus_per_node)
                        for b in MICRO_BATCH_SIZES:
                            m, rest = divmod(global_batch_tokens, seq_len * b * dims.dp)
                            if rest or m < max(1, pp):
                                continue
                            out.append(_plan_one(arch, seq_len, par, dims, b, m, hw, compute_s))
    return out


def _plan_one(arch, seq_len, par, dims, b, m, hw, compute_s) -> Candidate:
    step = Step(seq_len, b, m, 2, par.activation_checkpointing, par.grad_reduce, par.pp_schedule)
    memory = memory_per_device(
        arch,
        seq_len,
        b,
        hw.gpus,
        par.activation_checkpointing,
        accumulation=m,
        grad_reduce=par.grad_reduce,
        dims=dims,
        schedule=par.pp_schedule,
    )["total"]
    stages = [stage_params(arch, dims.tp, dims.pp, rank) for rank in range(dims.pp)]
    params = max(layers * block + root for layers, block, root in stages)
    comm = communication_bytes(arch, dims, step, params, stages[0][0])
    seconds = step_seconds(compute_s, comm, dims, step, hw.gpus_per_node)
    return Candidate(par, b, m, memory, seconds, sum(comm.values()) / 2**30)


def suggest_layouts(
    arch: LlamaConfig, seq_len: int, global_batch_tokens: int, hw: Hardware, **kw
) -> list[Candidate]:
    """The layouts that fit, fastest first."""
    planned = enumerate_layouts(arch, seq_len, global_batch_tokens, hw, **kw)
    fitting = [c for c in planned if c.memory_gib <= hw.memory_gib]
    if not fitting:
        least = min((c.memory_gib for c in planned), default=float("nan"))
        raise LmforgeError(
            f"no layout of {hw.gpus} GPUs fits {hw.memory_gib:g} GiB (the least needs "
            f"{least:.1f} GiB, of {len(planned)} valid): use more GPUs or a shorter seq_len"
        )
    # equal times (communication hidden under compute): fewer bytes sent, then less memory
    return sorted(fitting, key=lambda c: (c.step_s["total"], c.sent_gib, c.memory_gib))


def format_suggestion(ranked: list[Candidate], hw: Hardware, shown: int = 6) -> str:
    best = ranked[0].parallel
    lines = [
        f"suggested layout for {hw.gpus} GPUs of {hw.memory_gib:g} GiB ({len(ranked)} fit):",
        f"  --set parallel.tp={best.tp} --set parallel.pp={best.pp} --set parallel.cp={best.cp}"
        f" --set parallel.pp_schedule={best.pp_schedule}"
        f" --set parallel.activation_checkpointing={str(best.activation_checkpointing).lower()}"
        f" --set train.micro_batch_size={ranked[0].micro_batch}",
    ]
    lines.append(ROW_HEADER)
    lines += [("* " if i == 0 else "  ") + c.row() for i, c in enumerate(ranked[:shown])]
    plain = [c for c in ranked if c.parallel.model_parallel == 1]
    if best.model_parallel > 1:  # what FSDP alone would give, for comparison
        lines.append(("F " + plain[0].row()) if plain else "F (no layout of FSDP alone fits)")
    return "\n".join(lines)
