"""The per-worker training loop: what every Ray Train worker runs (and `run_local`, 1 process).

One loop for pretraining (`lmforge train`) and fine-tuning (`lmforge finetune`). The driver
builds a `LoopSpec` (train/config.py) from the stage config: fine-tuning starts from a base
artifact's architecture and weights, may train LoRA adapters, and its loss is over masked
target tokens of packed documents; all else (FSDP2, accumulation, schedules, checkpoints,
resume, metrics) is the same code.

`train_loop` reads top to bottom on one screen; setup (train/run.py), one optimizer step and
validation are below it, metrics in train/metrics.py, the exported artifact in train/export.py.
Pipeline parallelism (`parallel.pp` > 1) swaps in train/pipeline.py's model, batches, step,
validation and export gather, at one branch at the top of `train_loop`.
No Ray import at module level: `run_local` trains in a plain process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

from lmforge import storage, tracking
from lmforge.model.llama import cross_entropy
from lmforge.train.checkpoint import Checkpointer, artifact_state, load_full_state
from lmforge.train.config import LoopSpec, SpecSource
from lmforge.train.context_parallel import cp_context
from lmforge.train.data import Prefetcher, bits_per_byte
from lmforge.train.export import export_model, warm_curves, write_curves
from lmforge.train.metrics import MetricsLog, phase
from lmforge.train.optim import build_optimizer, lr_at, set_lr
from lmforge.train.parallelize import (
    build_model,
    local_loss,
    loss_context,
    set_gradient_sync,
    shorten_collective_timeout,
)
from lmforge.train.run import Run, WorkerEnv, autocast, collect_garbage, manual_gc, setup_run


def train_loop(
    spec: LoopSpec,
    env: WorkerEnv,
    on_step: Callable[[int], None] | None = None,
    fsdp_on_one: bool = False,
) -> dict[str, Any]:
    """Train `spec` on this worker. `on_step(step)` runs after each step (the GPU bench's
    timer and profiler); `fsdp_on_one` shards with FSDP2 on a process group of one too, so
    one GPU runs the multi-GPU code path (the bench)."""
    run = setup_run(spec, env)
    phase(env, spec.output, "data")
    loop, parallel = spec.train, spec.parallel
    read_step, step_fn, evaluate_fn, full_state = step_batches, train_step, evaluate, None
    if parallel.pp > 1:  # the one pipeline-parallel branch: its parts are train/pipeline.py's
        from lmforge.train.pipeline import build_pipeline

        pipe = build_pipeline(run, env)
        run, model = pipe.run, pipe.model
        read_step, step_fn, evaluate_fn = pipe.step_batches, pipe.train_step, pipe.evaluate
        full_state = pipe.full_state
    else:
        model = build_model(
            run.arch,
            env.device,
            seed=loop.seed,
            fsdp=parallel.fsdp and (env.world_size > 1 or fsdp_on_one),
            activation_checkpointing=parallel.activation_checkpointing,
            compile=parallel.compile,
            bf16=run.bf16,
            meta_init=parallel.meta_init,
            prepare=run.adapt,
            mesh=run.device_mesh(env, fsdp_on_one),
        )
    if spec.base:
        load_full_state(model, artifact_state(spec.base) if env.rank == 0 else {})
    optimizer = build_optimizer(spec.optim, model, env.device)
    phase(env, spec.output, "model")
    ckpt = Checkpointer(
        storage.join(spec.output, "checkpoints"),
        spec.checkpoint.keep_last,
        env.rank,
        env.world_size,
        env.in_ray,
        trainable_only=spec.lora is not None,
    )
    resumed = ckpt.restore(model, optimizer) if spec.checkpoint.resume else None
    step = resumed["step"] if resumed else 0
    log = MetricsLog(env, run, start_step=step)
    if resumed:
        log.say(
            f"resumed from {resumed['path']} (step {step}, saved by {resumed['world_size']} workers)"
        )
    elif spec.eval_at_start:  # the base model's scores, for before/after
        before = {"step": 0, **evaluate_fn(model, run, env), **evaluate_tasks(model, run, env)}
        report(before, env)
        log.write(before)
    metrics: dict[str, Any] = {}
    every_ckpt = spec.checkpoint.every_steps
    # The next steps' batches are read and pinned in a background thread while this one runs.
    batches = Prefetcher(
        lambda s: read_step(run, s, env), pin=env.device.type == "cuda", end=run.total_steps
    )
    while step < run.total_steps:
        maybe_inject_fault(loop.fault_at_step, step + 1, spec.output, env)
        lr = lr_at(spec.optim, step, run.total_steps)
        set_lr(optimizer, lr)
        start = time.perf_counter()
        with record_function("data"):
            batch = batches.get(step)
        loss, grad_norm = step_fn(model, optimizer, run, batch, env, spec.optim.grad_clip)
        ckpt.wait()  # a checkpoint started last step was written during this one: complete it
        if step == (resumed["step"] if resumed else 0):
            shorten_collective_timeout()  # the first step (compile, warm-up) is behind us
            phase(env, spec.output, "first_step")
            tracking.first_step_done()  # an in-process stage run opens now (open_run(defer))
            warm_curves(env)
        step += 1
        collect_garbage(step)
        last = step == run.total_steps
        logs = step % loop.log_every == 0 or last
        evals = last or bool(loop.eval_every and step % loop.eval_every == 0)
        saves = (last and spec.checkpoint.at_end) or bool(every_ckpt and step % every_ckpt == 0)
        if logs or evals or saves:  # the only host sync, inside the timed step (docs/training.md)
            with record_function("sync"):
                loss, grad_norm = host_values(loss, grad_norm)
        log.add_step_time(time.perf_counter() - start)
        metrics = {}
        if logs:
            metrics = log.train_metrics(step, loss, lr, grad_norm)
        if evals:
            metrics = {"step": step, **metrics, **evaluate_fn(model, run, env)}
            metrics.update(evaluate_tasks(model, run, env))
        if saves:
            rows = step * run.plan.global_batch_rows
            ckpt.save(step, rows, model, optimizer, metrics or {"step": step})
        elif metrics:
            report(metrics, env)
        log.write(metrics)
        if every_ckpt and step % every_ckpt == 0 and not last:  # the end's is export_model's
            write_curves(spec.output, env)
        if on_step:
            on_step(step)
    phase(env, spec.output, "last_step")
    batches.close()
    ckpt.close()  # the last checkpoint's files are written and marked complete
    phase(env, spec.output, "final_checkpoint")
    export_model(model, run, env, metrics, full_state)
    phase(env, spec.output, "artifact")
    return log.summary(metrics)


# ---------------------------------------------------------------- one step, validation


def step_batches(run: Run, step: int, env: WorkerEnv) -> dict[str, Any]:
    """Host arrays of this worker's micro-batches of global batch `step` (the prefetch thread):
    {"micro": [rows (b, T + 1) or the fine-tuning columns, ...]}, and for the masked loss the
    worker's target-token count, counted here so the loop needs no host read of it."""
    plan = run.plan
    spans = [plan.micro_rows(step, run.dp_rank, m) for m in range(plan.accum_steps)]
    if not run.masked:
        return {"micro": [run.train.rows(first, count) for first, count in spans]}
    micro = [run.train.batch(first, count) for first, count in spans]
    targets = sum(int(b["loss_mask"][:, 1:].sum()) for b in micro)
    return {"micro": micro, "targets": np.array([targets], dtype=np.float32)}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (pinned on CUDA) to `device` without waiting: a DMA in stream order."""
    return t.to(device, non_blocking=True)


def train_step(model, optimizer, run: Run, batch: dict, env: WorkerEnv, grad_clip: float | None):
    """One optimizer step over this worker's share of a global batch (`step_batches`):
    (mean loss, grad norm), both still on the device (the loop reads them on logging steps)."""
    optimizer.zero_grad(set_to_none=True)
    if run.masked:
        return masked_train_step(model, optimizer, run, batch, env, grad_clip)
    accum = run.plan.accum_steps
    total = torch.zeros((), device=env.device)
    for micro, host_rows in enumerate(batch["micro"]):
        rows = to_device(host_rows, env.device)  # (b, T + 1)
        set_gradient_sync(model, run.reduce_every_micro_batch or micro == accum - 1)
        # cp > 1: each rank takes 2 of the 2 x cp sequence chunks; tp > 1: the loss on the
        # vocab shards of the logits (both no-op contexts otherwise)
        with (
            cp_context(model, run.mesh, rows[:, :-1], rows[:, 1:]) as (inputs, targets),
            loss_context(run.mesh),
        ):
            with record_function("forward"):
                with autocast(run, env):
                    logits = model(inputs)  # (b, T, V)
                loss = local_loss(cross_entropy(logits, targets)) / accum
                del logits  # the loss keeps what backward needs; the (b, T, V) logits can go now
            with record_function("backward"):
                loss.backward()
        total += loss.detach()
    return finish_step(model, optimizer, total, grad_clip)


def masked_train_step(model, optimizer, run: Run, batch: dict, env: WorkerEnv, grad_clip):
    """Fine-tuning: loss on the masked-in target tokens only, packed documents kept apart.

    The loss is the mean over every target token of the global batch (not a mean of per-row
    means), whatever the worker count: each worker sums its token losses and divides by the
    global target count (an all-reduce before the first forward, on the device: the host never
    reads it), times the world size that FSDP's gradient averaging divides by again.
    """
    accum = run.plan.accum_steps
    count = to_device(batch["targets"], env.device)  # (1,) this worker's target tokens
    if dist.is_initialized():
        dist.all_reduce(count)
    scale = env.world_size / count.clamp(min=1.0)
    total = torch.zeros((), device=env.device)
    for m, host in enumerate(batch["micro"]):
        tokens, targets, segments = masked_batch(host, env.device)
        set_gradient_sync(model, run.reduce_every_micro_batch or m == accum - 1)
        with loss_context(run.mesh):  # tp > 1: the loss on the logits' vocab shards
            with record_function("forward"):
                with autocast(run, env):
                    logits = model(tokens, segments=segments)  # (b, T, V)
                loss = (token_losses(logits, targets).sum() * scale).squeeze(0)
                del logits  # the loss keeps what backward needs; the (b, T, V) logits can go now
            with record_function("backward"):
                loss.backward()
        total += loss.detach()
    return finish_step(model, optimizer, total, grad_clip)


def masked_batch(batch: dict, device: torch.device):
    """(inputs, targets with -100 where no loss, segments of the inputs), each (b, T), from
    host arrays or tensors (pinned tensors are copied without a host sync)."""
    # Whole (contiguous) arrays cross, sliced on the device: a strided host view would be
    # staged through pageable memory first.
    rows, mask, segments = (
        to_device(torch.as_tensor(batch[k]), device) for k in ("tokens", "loss_mask", "segments")
    )  # each (b, T + 1)
    targets = torch.where(mask[:, 1:].bool(), rows[:, 1:], torch.full_like(rows[:, 1:], -100))
    return rows[:, :-1], targets, segments[:, :-1]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token next-token loss (fp32), 0 where the target is -100: (b, T), a plain tensor
    (under `loss_context`, from the logits' vocab shards)."""
    losses = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    )
    return local_loss(losses).view(targets.shape)


def finish_step(model, optimizer, total: torch.Tensor, grad_clip: float | None):
    """Clip, step; (this worker's loss, grad norm) as device tensors: no host sync here."""
    with record_function("optimizer"):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
        optimizer.step()
    return total, norm


def host_values(loss: torch.Tensor, norm: torch.Tensor) -> tuple[float, float]:
    """(mean loss over workers, grad norm) as numbers: the host waits for the device here.
    Every worker calls it at the same steps (collectives)."""
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    both = torch.stack([all_reduce_mean(loss.detach().float()), norm.detach().float()])
    mean_loss, grad_norm = both.tolist()  # one device-to-host copy for both
    return mean_loss, grad_norm


@torch.no_grad()
def evaluate(model, run: Run, env: WorkerEnv) -> dict[str, Any]:
    """Mean loss over the first val sequences (each worker a slice) and bits per byte."""
    if run.val is None:
        return {}
    n = min(run.val.num_rows, run.spec.train.eval_sequences)
    rank, ranks = run.dp_rank, run.dims.dp  # a tensor-parallel group reads the same rows
    b, share = run.plan.micro_batch_size, math.ceil(n / ranks)
    sums = torch.zeros(2, device=env.device, dtype=torch.float64)  # (sum of token losses, tokens)
    # Every worker runs the same number of forwards (FSDP gathers in each); rows past n weigh 0.
    for first in range(rank * share, (rank + 1) * share, b):
        count = min(b, (rank + 1) * share - first)
        if run.masked:  # fine-tuning: only the target tokens count (e.g. assistant turns)
            tokens, targets, segments = masked_batch(run.val.batch(first, count), env.device)
        else:
            rows = torch.from_numpy(run.val.rows(first, count)).to(env.device)  # (b, T + 1)
            tokens, targets, segments = rows[:, :-1], rows[:, 1:], None
        with loss_context(run.mesh):  # tp > 1: the loss on the logits' vocab shards
            with autocast(run, env):
                logits = model(tokens, segments=segments)
            losses = token_losses(logits, targets)  # (b, T)
        keep = (torch.arange(first, first + count, device=env.device) < n).double()  # (b,)
        sums[0] += (losses.double().sum(1) * keep).sum()
        sums[1] += ((targets != -100).double().sum(1) * keep).sum()
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    bpb = bits_per_byte(loss, run.val_tokens_per_byte)
    return {"val_loss": loss, **({"val_bpb": bpb} if bpb is not None else {})}


@torch.no_grad()
def evaluate_tasks(model, run: Run, env: WorkerEnv) -> dict[str, float]:
    """The config's eval tasks on the model in training, scored as `lmforge eval` scores them.

    Every worker runs the same items in the same order: under FSDP each forward all-gathers
    the weights, so the ranks must step together (the scores are identical on every rank).
    """
    if not run.spec.train.eval_tasks:
        return {}
    from tokenizers import Tokenizer

    from lmforge.eval.stage import evaluate_in_process

    tokenizer = Tokenizer.from_str(
        storage.read_text(storage.join(run.spec.data_dir, "tokenizer.json"))
    )
    model.eval()
    try:
        with autocast(run, env):
            report = evaluate_in_process(
                model, tokenizer, run.spec.train.eval_tasks, limit=run.spec.train.eval_task_limit
            )
    finally:
        model.train()
    return {
        f"eval/{task}/{metric}": value
        for task, metrics in report.items()
        for metric, value in metrics.items()
        if isinstance(value, int | float)
    }


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t


def report(metrics: dict[str, Any], env: WorkerEnv) -> None:
    """Metrics to Ray Train (the dashboard, Result.metrics); every worker calls it together."""
    if env.in_ray:
        import ray.train

        ray.train.report(metrics)


def maybe_inject_fault(fault_at_step: int | None, step: int, output: str, env: WorkerEnv) -> None:
    """Testing: the last worker crashes once at `fault_at_step` (a marker file makes it once)."""
    if fault_at_step != step or env.rank != env.world_size - 1:
        return
    marker = storage.join(output, f"fault_injected_at_{step}")
    if storage.exists(marker):
        return
    storage.write_text(marker, "injected\n")
    raise RuntimeError(f"injected fault: worker {env.rank} crashes at step {step}")


# ---------------------------------------------------------------- entry points


def ray_train_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: `config` is the driver's LoopSpec as plain data."""
    work(LoopSpec.model_validate(config), WorkerEnv.from_ray())


def in_process_worker(spec: LoopSpec, threads: int, gpu: bool) -> None:
    """The one worker of `resources.in_process`, in the calling process: `threads` CPU threads
    (what Ray sets for a worker's `cpus_per_worker`), on GPU 0 when `gpu`."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    try:
        work(spec, WorkerEnv(0, 1, device, in_ray=False))
    finally:
        torch.set_num_threads(before)


def work(spec: LoopSpec, env: WorkerEnv) -> None:
    """One worker's whole run; rank 0 leaves the summary the driver reads (train_summary.json)."""
    phase(env, spec.output, "worker")
    with manual_gc():
        summary = train_loop(spec, env)
    if env.rank == 0:
        storage.write_json(storage.join(spec.output, "train_summary.json"), summary)


def run_local(
    cfg: SpecSource, output: str, device: str = "cpu", data_path: str | None = None
) -> dict[str, Any]:
    """The same loop in this process, one worker, no Ray: tests and baselines."""
    env = WorkerEnv(0, 1, torch.device(device), in_ray=False)
    with manual_gc():
        return train_loop(cfg.loop_spec(output, data_path, workers=1), env)
