"""Pipeline parallelism (`parallel.pp` > 1): the model split by layer into stages, one or two per
worker, run by a `torch.distributed.pipelining` schedule (1F1B or interleaved 1F1B) over the
step's gradient-accumulation micro-batches.

A stage is a `Llama` that keeps its own blocks under their original names and None for the
rest: the first stage keeps the embedding, the last the final norm and the head. So the state
dict of every worker's stages together is the full model's, key for key, and a DCP checkpoint
saved at any pp resumes at any other (or in one process). Stages are laid out loop-style, as
torchtitan does: with P workers and 2 stages each, worker r holds stages r and r + P.

The loop (train/loop.py) branches here once: `build_pipeline` gives the model (this worker's
stages as one module, for the optimizer and checkpoints) and the pipeline's versions of reading
a step's rows, one optimizer step, validation and the full state for export. Pretraining only:
the masked fine-tuning loss needs each micro-batch's segments on every stage.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge import LmforgeError
from lmforge.model.llama import Llama, cross_entropy
from lmforge.train.data import bits_per_byte
from lmforge.train.layout import ParallelDims, check_parallel_layout
from lmforge.train.parallelize import parallelize
from lmforge.train.run import Run, WorkerEnv, autocast


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "interleaved_1f1b" else 1


def rank_stages(pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The stages worker `pp_rank` of the pipeline holds, loop-style: pp_rank, pp_rank + pp..."""
    return [pp_rank + i * pp for i in range(per_rank)]


def stage_layers(n_layers: int, stage: int, n_stages: int) -> list[str]:
    """The names of the blocks of `stage` (an equal, contiguous share of the layers)."""
    per = n_layers // n_stages
    return [str(i) for i in range(stage * per, (stage + 1) * per)]


def check_pipeline(run: Run, dims: ParallelDims) -> None:
    """What pipelining needs beyond the layout's divisibility (check_parallel_layout); each
    failure is one line naming the setting and the fix."""
    spec, parallel, pp = run.spec, run.spec.parallel, dims.pp
    check_parallel_layout(parallel, dims.world, run.arch, run.train.seq_len)
    if run.masked or spec.base or spec.lora is not None:
        raise LmforgeError(
            "parallel.pp > 1 pretrains only (next-token loss, no base model or LoRA): "
            "fine-tune with parallel.pp=1"
        )
    if run.arch.tie_embeddings:
        raise LmforgeError(
            "model.tie_embeddings=true shares the embedding (first pipeline stage) with the head "
            "(last stage): set model.tie_embeddings=false, or parallel.pp=1"
        )
    if dims.tp > 1 or dims.cp > 1:
        raise LmforgeError(
            "parallel.pp > 1 does not compose with parallel.tp or parallel.cp yet: set them to 1"
        )
    if parallel.meta_init:
        raise LmforgeError(
            "parallel.meta_init=true is not supported with parallel.pp > 1 yet: set it to null"
        )
    if spec.train.eval_tasks:
        raise LmforgeError(
            "train.eval_tasks need the whole model in one worker: with parallel.pp > 1 leave "
            "them empty and run `lmforge eval` on the artifact"
        )
    micro = run.plan.accum_steps
    interleaved = parallel.pp_schedule == "interleaved_1f1b"
    if micro < pp or (interleaved and micro % pp):
        need = "a multiple of" if interleaved else "at least"
        raise LmforgeError(
            f"a step has {micro} micro-batches per pipeline (train.global_batch_tokens / (seq_len "
            f"x train.micro_batch_size x {dims.dp} data-parallel workers)); parallel.pp_schedule="
            f"{parallel.pp_schedule} needs {need} parallel.pp={pp}: raise global_batch_tokens "
            "or lower micro_batch_size"
        )


def split_model(model: Llama, layers: list[str], first: bool, last: bool) -> Llama:
    """A `Llama` sharing `model`'s modules: the blocks named `layers` (original names), the
    embedding if `first`, the final norm and head if `last`, None for the rest."""
    part = type(model).__new__(type(model))
    # Every attribute of the model (its config, the rope table, whatever its forward reads),
    # with tables of its own (children, parameters, buffers, hooks): FSDP's hooks on one part
    # must not land on another.
    part.__dict__.update(
        {k: copy.copy(v) if isinstance(v, dict | set) else v for k, v in model.__dict__.items()}
    )
    part.tok_embeddings = model.tok_embeddings if first else None
    part.layers = nn.ModuleDict({name: model.layers[name] for name in layers})
    part.norm = model.norm if last else None
    part.output = model.output if last else None
    return part


@dataclass
class Pipeline:
    """This worker's share of the pipeline and the loop's pieces that differ under it."""

    run: Run
    dims: ParallelDims
    rank: int
    group: Any  # the "pp" process group
    model: Llama  # this worker's stages as one module: original names, for optimizer and DCP
    modules: list[Llama]  # the stage modules, in stage order
    stage_ids: list[int]
    schedule: Any

    @property
    def pp_rank(self) -> int:
        return self.dims.coords(self.rank)["pp"]

    @property
    def n_stages(self) -> int:
        return self.dims.pp * len(self.stage_ids)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def step_batches(self, run: Run, step: int, env: WorkerEnv) -> dict[str, Any]:
        """Host rows of global batch `step` for this pipeline (its data-parallel rank's share):
        {"rows": (micro-batches x b, T + 1)}; the schedule splits them into micro-batches."""
        plan, data_rank = run.plan, self.dims.dp_rank(env.rank)
        spans = [plan.micro_rows(step, data_rank, m) for m in range(plan.accum_steps)]
        return {"rows": np.concatenate([run.train.rows(first, n) for first, n in spans])}

    def train_step(self, model, optimizer, run: Run, batch: dict, env: WorkerEnv, grad_clip):
        """One optimizer step through the schedule: (the mean loss of the micro-batches, the
        grad norm of the whole model), on every worker, on the device.

        The loss function is the non-pipelined path's per-micro-batch mean and the schedule
        divides the summed gradients by the number of micro-batches (scale_grads), so the
        gradients, the loss and the norm are a one-process run's."""
        optimizer.zero_grad(set_to_none=True)
        rows = batch["rows"].to(env.device, non_blocking=True)  # (m x b, T + 1)
        losses: list[torch.Tensor] = []
        args = (rows[:, :-1],) if self.has_first else ()
        target = rows[:, 1:] if self.has_last else None
        with autocast(run, env):
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        loss = torch.zeros((), device=env.device)
        if self.has_last:
            loss = torch.stack([x.detach().float() for x in losses]).mean()
        # Every worker of the pipeline reports the last stage's loss (the loop averages it
        # over the data-parallel workers, as it does without pipelining).
        dist.broadcast(loss, group=self.group, group_src=self.dims.pp - 1)
        norm = clip_grad_norm(list(model.parameters()), grad_clip, self.group)
        optimizer.step()
        return loss, norm

    @torch.no_grad()
    def evaluate(self, model, run: Run, env: WorkerEnv) -> dict[str, Any]:
        """The loop's `evaluate`: mean loss over the first val sequences (each data-parallel
        rank a slice, through the stages in order) and bits per byte."""
        if run.val is None:
            return {}
        n = min(run.val.num_rows, run.spec.train.eval_sequences)
        dp, data_rank = self.dims.dp, self.dims.dp_rank(env.rank)
        b, share = run.plan.micro_batch_size, math.ceil(n / dp)
        sums = torch.zeros(2, device=env.device, dtype=torch.float64)  # (token losses, tokens)
        for first in range(data_rank * share, (data_rank + 1) * share, b):
            count = min(b, (data_rank + 1) * share - first)
            rows = torch.from_numpy(run.val.rows(first, count)).to(env.device)  # (b, T + 1)
            with autocast(run, env):
                logits = self.forward(rows[:, :-1])
            if logits is None:
                continue  # not the last stage: it only passed activations on
            losses = F.cross_entropy(
                logits.flatten(0, 1).float(), rows[:, 1:].flatten().long(), reduction="none"
            ).view(count, -1)  # (b, T)
            keep = (torch.arange(first, first + count, device=env.device) < n).double()  # (b,)
            sums[0] += (losses.double().sum(1) * keep).sum()
            sums[1] += (keep * losses.shape[1]).sum()
        dist.all_reduce(sums)  # only the last stages added: each row counted once
        loss = (sums[0] / sums[1]).item()
        bpb = bits_per_byte(loss, run.val_tokens_per_byte)
        return {"val_loss": loss, **({"val_bpb": bpb} if bpb is not None else {})}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """tokens (b, T) through every stage in order, activations sent point to point: the
        logits (b, T, V) on the worker of the last stage, None elsewhere. No backward, so no
        schedule: each worker runs its stages as their inputs arrive."""
        b, T = tokens.shape
        x: torch.Tensor | None = None
        for stage in range(self.n_stages):
            if stage not in self.stage_ids:
                continue
            if stage > 0:  # activations travel as fp32 (b, T, D) whatever the compute dtype
                x = torch.empty(b, T, self.run.arch.dim, device=tokens.device)
                dist.recv(x, group=self.group, group_src=(stage - 1) % self.dims.pp)
            out = self.modules[self.stage_ids.index(stage)](tokens if stage == 0 else x)
            if stage == self.n_stages - 1:
                return out
            dst = (stage + 1) % self.dims.pp
            dist.send(out.float().contiguous(), group=self.group, group_dst=dst)
        return None

    def full_state(self, model) -> dict[str, torch.Tensor]:
        """The unsharded model on CPU at rank 0 (the export's `full_state`): each pipeline
        worker gathers its stages over its data-parallel group, then rank 0's pipeline
        gathers the stages. A collective: every worker calls it; the others get {}."""
        state = {}
        for key, value in model.state_dict().items():
            if hasattr(value, "full_tensor"):  # a DTensor under FSDP2
                value = value.full_tensor()
            state[key] = value.detach().cpu()
        if self.dims.dp_rank(self.rank) != 0:
            return {}
        parts: list[Any] | None = [None] * self.dims.pp if self.pp_rank == 0 else None
        dist.gather_object(state, parts, group=self.group, group_dst=0)
        if self.rank != 0:
            return {}
        return {k: v for part in parts or [] for k, v in part.items()}


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None, group) -> torch.Tensor:
    """The whole model's gradient norm (every stage's, across the pipeline), and the gradients
    clipped to `max_norm` (None: not clipped)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # DTensor shards under FSDP2: reduced over data parallel
        norm = norm.full_tensor()
    squared = norm.float() ** 2
    dist.all_reduce(squared, group=group)
    norm = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm or math.inf, norm)
    return norm


def build_pipeline(run: Run, env: WorkerEnv) -> Pipeline:
    """This worker's stages, parallelised (checkpointing, compile, FSDP2 per stage on the
    data-parallel mesh), and the schedule over them; `run` as setup_run made it."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleInterleaved1F1B,
    )

    parallel = run.spec.parallel
    dims = run.dims  # setup_run's layout and batch plan (over the data-parallel ranks)
    check_pipeline(run, dims)
    mesh = run.device_mesh(env)
    group = mesh["pp"].get_group()
    per_rank = stages_per_rank(parallel.pp_schedule)
    n_stages = dims.pp * per_rank
    ids = rank_stages(dims.coords(env.rank)["pp"], dims.pp, per_rank)
    # The whole model is initialised as one process would (same seed, same numbers), then
    # each worker keeps its stages; the rest is freed.
    torch.manual_seed(run.spec.train.seed)
    with torch.device(env.device):
        full = Llama(run.arch)
    layers = [stage_layers(run.arch.n_layers, s, n_stages) for s in ids]
    modules = [
        split_model(full, names, s == 0, s == n_stages - 1)
        for s, names in zip(ids, layers, strict=True)
    ]
    # One stage: the model is it; two: a module of both (shared parts, no forward of its own).
    union = sum(layers, [])
    model = modules[0] if per_rank == 1 else split_model(full, union, 0 in ids, n_stages - 1 in ids)
    del full
    fsdp = parallel.fsdp and dims.dp > 1
    bf16_params = run.bf16 and env.device.type == "cuda" and fsdp
    for module in modules:
        parallelize(
            module,
            fsdp=fsdp,
            activation_checkpointing=parallel.activation_checkpointing,
            compile=parallel.compile,
            param_dtype=torch.bfloat16 if bf16_params else None,
            mesh=mesh if fsdp else None,  # parallelize takes FSDP2's submesh (dp_shard) itself
        )
    stages = [
        PipelineStage(module, s, n_stages, env.device, group=group)
        for s, module in zip(ids, modules, strict=True)
    ]
    if per_rank == 1:
        schedule = Schedule1F1B(stages[0], run.plan.accum_steps, loss_fn=cross_entropy)
    else:
        schedule = ScheduleInterleaved1F1B(stages, run.plan.accum_steps, loss_fn=cross_entropy)
    return Pipeline(run, dims, env.rank, group, model, modules, ids, schedule)
