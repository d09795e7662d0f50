"""The per-worker training loop: what every Ray Train worker runs (and `run_local`, 1 process).

One loop for pretraining (`lmforge train`) and fine-tuning (`lmforge finetune`). A fine-tuning
config adds `base` (the model artifact to start from) and `lora` (adapters instead of full
fine-tuning), and its data has loss masks and packed documents (`PackedShards.masked`); all else
(FSDP2, accumulation, schedules, checkpoints, resume, metrics) is the same code.

`train_loop` reads top to bottom on one screen; setup, one optimizer step, validation,
checkpoints and metrics are named helpers below it.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge import LmforgeError, storage
from lmforge.config import config_yaml
from lmforge.model.artifact import load_config, save_artifact
from lmforge.model.llama import LlamaConfig, cross_entropy, flops_per_token
from lmforge.train.checkpoint import (
    Checkpointer,
    artifact_state,
    full_model_state,
    load_full_state,
)
from lmforge.train.config import TrainConfig
from lmforge.train.data import (
    BatchPlan,
    PackedShards,
    batch_plan,
    bits_per_byte,
    read_manifest,
    tokens_per_byte,
)
from lmforge.train.hardware import for_worker
from lmforge.train.mfu import mfu
from lmforge.train.optim import build_optimizer, lr_at, set_lr
from lmforge.train.parallelize import build_model, set_gradient_sync


def train_loop(
    cfg: TrainConfig,
    output: str,
    env: WorkerEnv,
    data_path: str | None = None,
    hardware: dict[str, Any] | None = None,
) -> dict[str, Any]:
    run = setup_run(cfg, env, data_path or cfg.data.path, hardware)
    model = build_model(
        run.arch, env.device, seed=cfg.train.seed, fsdp=cfg.parallel.fsdp and env.world_size > 1,
        activation_checkpointing=cfg.parallel.activation_checkpointing,
        compile=cfg.parallel.compile, bf16=run.bf16, meta_init=cfg.parallel.meta_init,
        prepare=run.adapt,
    )  # fmt: skip
    if run.base:
        load_full_state(model, artifact_state(run.base) if env.rank == 0 else {})
    optimizer = build_optimizer(cfg.optim, model, env.device)
    ckpt = Checkpointer(storage.join(output, "checkpoints"), cfg.checkpoint.keep_last,
                        env.rank, env.world_size, env.in_ray, trainable_only=run.lora is not None)  # fmt: skip
    resumed = ckpt.restore(model, optimizer) if cfg.checkpoint.resume else None
    step = resumed["step"] if resumed else 0
    log = MetricsLog(output, env, run, start_step=step)
    if resumed:
        log.say(
            f"resumed from {resumed['path']} (step {step}, saved by {resumed['world_size']} workers)"
        )
    elif getattr(cfg.train, "eval_at_start", False):  # the base model's scores, for before/after
        start = {"step": 0, **evaluate(model, run, env), **evaluate_tasks(model, run, env)}
        report(start, env)
        log.write(start)
    metrics: dict[str, Any] = {}
    while step < run.total_steps:
        maybe_inject_fault(cfg.train.fault_at_step, step + 1, output, env)
        lr = lr_at(cfg.optim, step, run.total_steps)
        set_lr(optimizer, lr)
        start = time.perf_counter()
        loss, grad_norm = train_step(model, optimizer, run, step, env, cfg.optim.grad_clip)
        log.add_step_time(time.perf_counter() - start)
        step += 1
        last = step == run.total_steps
        metrics = {}
        if step % cfg.train.log_every == 0 or last:
            metrics = log.train_metrics(step, loss, lr, grad_norm)
        if last or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            metrics = {"step": step, **metrics, **evaluate(model, run, env)}
            metrics.update(evaluate_tasks(model, run, env))
        if last or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
            ckpt.save(
                step, step * run.plan.global_batch_rows, model, optimizer, metrics or {"step": step}
            )
        elif metrics:
            report(metrics, env)
        log.write(metrics)
    export_model(model, run, output, env, metrics)
    return log.summary(metrics)


# ---------------------------------------------------------------- setup


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    device: torch.device
    in_ray: bool

    @classmethod
    def from_ray(cls) -> WorkerEnv:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives and object broadcasts use it
        return cls(ctx.get_world_rank(), ctx.get_world_size(), device, in_ray=True)


@dataclass
class Run:
    """What the loop needs besides model and optimizer: data, shapes, budget, flops."""

    cfg: TrainConfig
    data_path: str
    arch: LlamaConfig
    base: str | None  # fine-tuning: the artifact whose weights the model starts from
    lora: Any  # fine-tuning: the LoRA config when adapters train instead of all weights
    train: PackedShards
    val: PackedShards | None
    plan: BatchPlan
    total_steps: int
    bf16: bool
    precision_reason: str
    flops_per_token: float
    peak_tflops: float
    peak_source: str
    val_tokens_per_byte: float | None
    tokenizer_json: str | None

    @property
    def adapt(self):
        """What to do to the bare model before parallelising it: add LoRA adapters, or nothing."""
        if not self.lora:
            return None
        from lmforge.model.lora import apply_lora

        lora = self.lora
        return lambda model: apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)


def setup_run(
    cfg: TrainConfig, env: WorkerEnv, data_path: str, hardware: dict[str, Any] | None = None
) -> Run:
    """`hardware`: the driver's precision and peak (`lmforge.train.hardware`); None: decide here."""
    manifest = read_manifest(data_path)
    shuffle = getattr(cfg.data, "shuffle", True)
    train = PackedShards(storage.join(data_path, "train"), cfg.train.seed, shuffle)
    val_dir = storage.join(data_path, "val")
    val = PackedShards(val_dir) if storage.list_files(val_dir, suffix=".parquet") else None
    vocab = int(manifest.get("vocab_size") or 0) or None
    base = getattr(cfg, "base", None)
    lora = getattr(cfg, "lora", None)
    if base:  # fine-tuning: the architecture is the base artifact's
        arch = load_config(base)
        if arch.max_seq_len < train.seq_len:
            raise LmforgeError(
                f"data seq_len {train.seq_len} is longer than the base model's max_seq_len "
                f"{arch.max_seq_len}: lower data.seq_len"
            )
    else:
        arch = cfg.model.to_llama(vocab_size=vocab, seq_len=train.seq_len)
    if vocab and arch.vocab_size < vocab:
        raise LmforgeError(
            f"model.vocab_size={arch.vocab_size} is smaller than the tokenizer's {vocab}"
        )
    if env.world_size > 1 and not cfg.parallel.fsdp:
        raise LmforgeError(
            "parallel.fsdp=false trains on one worker only: set resources.num_workers=1"
        )
    plan = batch_plan(
        cfg.train.global_batch_tokens, cfg.train.micro_batch_size, env.world_size, train.seq_len
    )
    total = cfg.train.max_steps or max(1, (cfg.train.max_tokens or 0) // plan.global_batch_tokens)
    hw = for_worker(hardware, cfg.train, env.device)
    torch.manual_seed(cfg.train.seed)
    tok = storage.join(data_path, "tokenizer.json")
    return Run(
        cfg, data_path, arch, base, lora if lora and lora.enabled else None, train, val, plan,
        total, hw.bf16, hw.precision_reason, flops_per_token(arch, train.seq_len), hw.peak_tflops,
        hw.peak_source,
        tokens_per_byte(manifest, "val", val.num_rows, val.block_len) if val else None,
        storage.read_text(tok) if storage.exists(tok) else None,
    )  # fmt: skip


# ---------------------------------------------------------------- one step, validation


def autocast(run: Run, env: WorkerEnv):
    if not run.bf16:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=torch.bfloat16)


def train_step(model, optimizer, run: Run, step: int, env: WorkerEnv, grad_clip: float | None):
    """One optimizer step over this worker's share of global batch `step`: (mean loss, grad norm)."""
    optimizer.zero_grad(set_to_none=True)
    if run.train.masked:
        return masked_train_step(model, optimizer, run, step, env, grad_clip)
    accum = run.plan.accum_steps
    total = torch.zeros((), device=env.device)
    for micro in range(accum):
        first, count = run.plan.micro_rows(step, env.rank, micro)
        rows = torch.from_numpy(run.train.rows(first, count)).to(env.device)  # (b, T + 1)
        set_gradient_sync(model, micro == accum - 1)
        with autocast(run, env):
            logits = model(rows[:, :-1])  # (b, T, V)
        loss = cross_entropy(logits, rows[:, 1:]) / accum
        loss.backward()
        total += loss.detach()
    return finish_step(model, optimizer, total, grad_clip)


def masked_train_step(model, optimizer, run: Run, step: int, env: WorkerEnv, grad_clip):
    """Fine-tuning: loss on the masked-in target tokens only, packed documents kept apart.

    The loss is the mean over every target token of the global batch (not a mean of per-row
    means), whatever the worker count: each worker sums its token losses and divides by the
    global target count (an all-reduce before the first forward), times the world size that
    FSDP's gradient averaging divides by again.
    """
    accum = run.plan.accum_steps
    micro = [run.train.batch(*run.plan.micro_rows(step, env.rank, m)) for m in range(accum)]
    count = torch.tensor(
        float(sum(int(b["loss_mask"][:, 1:].sum()) for b in micro)), device=env.device
    )
    if dist.is_initialized():
        dist.all_reduce(count)
    scale = env.world_size / max(float(count), 1.0)
    total = torch.zeros((), device=env.device)
    for m, batch in enumerate(micro):
        tokens, targets, segments = masked_batch(batch, env.device)
        set_gradient_sync(model, m == accum - 1)
        with autocast(run, env):
            logits = model(tokens, segments=segments)  # (b, T, V)
        loss = token_losses(logits, targets).sum() * scale
        loss.backward()
        total += loss.detach()
    return finish_step(model, optimizer, total, grad_clip)


def masked_batch(batch: dict, device: torch.device):
    """(inputs, targets with -100 where no loss, segments of the inputs), each (b, T)."""
    rows = torch.from_numpy(batch["tokens"]).to(device)  # (b, T + 1)
    keep = torch.from_numpy(batch["loss_mask"][:, 1:]).to(device).bool()
    targets = torch.where(keep, rows[:, 1:], torch.full_like(rows[:, 1:], -100))
    return rows[:, :-1], targets, torch.from_numpy(batch["segments"][:, :-1]).to(device)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token next-token loss (fp32), 0 where the target is -100: (b, T)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    ).view(targets.shape)


def finish_step(model, optimizer, total: torch.Tensor, grad_clip: float | None):
    """Clip, step; (mean loss over workers, grad norm)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    optimizer.step()
    return all_reduce_mean(total).item(), float(norm)


@torch.no_grad()
def evaluate(model, run: Run, env: WorkerEnv) -> dict[str, Any]:
    """Mean loss over the first val sequences (each worker a slice) and bits per byte."""
    if run.val is None:
        return {}
    n = min(run.val.num_rows, run.cfg.train.eval_sequences)
    b, share = run.plan.micro_batch_size, math.ceil(n / env.world_size)
    sums = torch.zeros(2, device=env.device, dtype=torch.float64)  # (sum of token losses, tokens)
    # Every worker runs the same number of forwards (FSDP gathers in each); rows past n weigh 0.
    for first in range(env.rank * share, (env.rank + 1) * share, b):
        count = min(b, (env.rank + 1) * share - first)
        if run.val.masked:  # fine-tuning: only the target tokens count (e.g. assistant turns)
            tokens, targets, segments = masked_batch(run.val.batch(first, count), env.device)
        else:
            rows = torch.from_numpy(run.val.rows(first, count)).to(env.device)  # (b, T + 1)
            tokens, targets, segments = rows[:, :-1], rows[:, 1:], None
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
    if not run.cfg.train.eval_tasks:
        return {}
    from tokenizers import Tokenizer

    from lmforge.eval.stage import evaluate_in_process

    tokenizer = Tokenizer.from_str(storage.read_text(storage.join(run.data_path, "tokenizer.json")))
    model.eval()
    try:
        with autocast(run, env):
            report = evaluate_in_process(
                model, tokenizer, run.cfg.train.eval_tasks, limit=run.cfg.train.eval_task_limit
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


def export_model(model, run: Run, output: str, env: WorkerEnv, last: dict[str, Any]) -> None:
    """The artifact `<run>/model/`: consolidated weights (gathered to rank 0), config, tokenizer.

    LoRA adapters are merged into their weights, so the artifact is a plain model.
    """
    state = full_model_state(model)
    if env.rank == 0 and run.lora:
        from lmforge.model.lora import merge_lora_state

        state = merge_lora_state(state, run.lora.alpha / run.lora.rank)
    if env.rank == 0:
        save_artifact(
            storage.join(output, "model"), state, run.arch, run.tokenizer_json,
            config_yaml(run.cfg), lineage=lineage(run, output, last),
        )  # fmt: skip


def lineage(run: Run, output: str, last: dict[str, Any]) -> dict[str, Any]:
    """Where the artifact comes from (model/version.py): parent, data, config, run, val score."""
    import hashlib

    from lmforge.config import config_hash
    from lmforge.model.version import read_version

    manifest = storage.read_bytes(storage.join(run.data_path, "manifest.json"))
    name = output.rstrip("/").rsplit("/", 1)[-1]
    return {
        "parent": read_version(run.base)["version"] if run.base else None,
        "parent_path": run.base,
        "data_manifest_hash": hashlib.sha256(manifest).hexdigest()[:12],
        "config_hash": config_hash(run.cfg),
        "stage": "finetune" if run.base else "train",
        "run": name,
        "val_bpb": last.get("val_bpb"),
        "val_loss": last.get("val_loss"),
    }


# ---------------------------------------------------------------- metrics


class MetricsLog:
    """Rank 0 keeps `metrics.jsonl` (rewritten whole, so it works on object stores too) and prints."""

    def __init__(self, output: str, env: WorkerEnv, run: Run, start_step: int) -> None:
        self.env, self.run, self.path = env, run, storage.join(output, "metrics.jsonl")
        self.lines: list[str] = []
        if env.rank == 0 and storage.exists(self.path):  # after a resume: keep the curve up to it
            old = storage.read_text(self.path).splitlines()
            self.lines = [ln for ln in old if ln and json.loads(ln).get("step", 0) <= start_step]
        self.start_step, self.seconds, self.interval = start_step, 0.0, []
        self.gauges = None
        self.say(
            f"{run.arch.n_layers} layers, D={run.arch.dim}, {run.flops_per_token / 1e6:.1f} MFLOP/token; "
            f"{env.world_size} worker(s) x {run.plan.micro_batch_size} seqs x {run.plan.accum_steps} accum "
            f"= {run.plan.global_batch_tokens} tokens/step; {run.total_steps} steps; "
            f"peak {run.peak_tflops:.3g} TFLOP/s per device from {run.peak_source}"
        )
        self.say(f"precision {'bf16' if run.bf16 else 'fp32'} ({run.precision_reason})")

    def say(self, text: str) -> None:
        if self.env.rank == 0:
            # Under Ray Train, print() is teed to a logger and stdout (twice on the console).
            out = sys.__stdout__ if self.env.in_ray and sys.__stdout__ else sys.stdout
            print(f"[train] {text}", file=out, flush=True)

    def add_step_time(self, seconds: float) -> None:
        self.interval.append(seconds)
        self.seconds += seconds

    def train_metrics(self, step: int, loss: float, lr: float, grad_norm: float) -> dict[str, Any]:
        tokens = len(self.interval) * self.run.plan.global_batch_tokens
        tps = tokens / max(sum(self.interval), 1e-9)
        per_step = self.seconds / max(1, step - self.start_step)
        self.interval = []
        return {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": step * self.run.plan.global_batch_tokens, "tokens_per_s": tps,
            "mfu": mfu(tps, self.run.flops_per_token, self.run.peak_tflops * self.env.world_size),
            "memory_gib": memory_gib(self.env.device), "eta_s": per_step * (self.run.total_steps - step),
        }  # fmt: skip

    def write(self, metrics: dict[str, Any]) -> None:
        if self.env.rank != 0 or not metrics:
            return
        self.lines.append(json.dumps({"time": round(time.time(), 3), **metrics}))
        storage.write_text(self.path, "\n".join(self.lines) + "\n")
        if self.env.in_ray:  # Prometheus, for the Grafana dashboard (train/prometheus.py)
            if self.gauges is None:
                from lmforge.train.prometheus import TrainGauges

                self.gauges = TrainGauges(self.path.rstrip("/").rsplit("/", 2)[-2])
            self.gauges.update(metrics)
        parts = [f"step {metrics['step']}/{self.run.total_steps}"]
        for key, fmt in [("loss", ".4f"), ("val_loss", ".4f"), ("val_bpb", ".4f"), ("lr", ".2e"),
                         ("grad_norm", ".3f"), ("tokens_per_s", ",.0f"), ("memory_gib", ".2f")]:  # fmt: skip
            if key in metrics:
                parts.append(f"{key} {metrics[key]:{fmt}}")
        if metrics.get("mfu") is not None:  # None: over 100%, a wrong peak (train/mfu.py)
            parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
        if "eta_s" in metrics:
            parts.append(f"eta {metrics['eta_s']:.0f}s")
        self.say(" | ".join(parts))

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        steps = self.run.total_steps - self.start_step
        tokens = steps * self.run.plan.global_batch_tokens
        tps = tokens / max(self.seconds, 1e-9)
        return {
            "steps": self.run.total_steps, "steps_this_run": steps,
            "tokens": self.run.total_steps * self.run.plan.global_batch_tokens,
            "tokens_per_s": tps, "train_seconds": self.seconds,
            "mfu": mfu(tps, self.run.flops_per_token, self.run.peak_tflops * self.env.world_size),
            "peak_tflops_per_device": self.run.peak_tflops, "peak_source": self.run.peak_source,
            "flops_per_token": self.run.flops_per_token, "precision": "bf16" if self.run.bf16 else "fp32",
            **{k: last[k] for k in ("loss", "val_loss", "val_bpb") if k in last},
        }  # fmt: skip


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


# ---------------------------------------------------------------- entry points


def ray_train_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: the config travels as plain data."""
    cfg = config_class(config.get("kind", "train")).model_validate(config["config"])
    env = WorkerEnv.from_ray()
    summary = train_loop(
        cfg, config["output"], env, config.get("data_path"), config.get("hardware")
    )
    if env.rank == 0:
        storage.write_json(storage.join(config["output"], "train_summary.json"), summary)


def config_class(kind: str):
    if kind == "finetune":
        from lmforge.finetune.config import FinetuneConfig

        return FinetuneConfig
    return TrainConfig


def run_local(
    cfg: TrainConfig, output: str, device: str = "cpu", data_path: str | None = None
) -> dict[str, Any]:
    """The same loop in this process, one worker, no Ray: tests and baselines."""
    env = WorkerEnv(0, 1, torch.device(device), in_ray=False)
    return train_loop(cfg, output, env, data_path)
