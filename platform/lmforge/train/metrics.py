"""Training metrics: rank 0's `metrics.jsonl` and console lines, the run summary, and the same
metrics as Prometheus gauges for the Grafana dashboard's Training row.

Rank 0 also logs each line to the run's experiment tracker (MLflow by default): the stage
runner opened the run and left `tracking.json` in the run directory; a resumed run logs only
the steps its tracker has not seen, so a step is never recorded twice.

Rank 0 sets one gauge per metric of each `metrics.jsonl` line through `ray.util.metrics`, so
Ray's per-node metrics agent exports them (the chart's PodMonitor scrapes that port). Ray
prefixes application metrics with `ray_`: the gauge `lmforge_train_loss` is scraped as
`ray_lmforge_train_loss`, with a `run` label (the run directory's name). Only under Ray: a
plain `run_local` has no agent to export through.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

import torch

from lmforge import storage, tracking
from lmforge.stage import record_phase
from lmforge.train.mfu import mfu
from lmforge.train.run import Run, WorkerEnv

# metrics.jsonl key -> (gauge name, description)
GAUGES: dict[str, tuple[str, str]] = {
    "step": ("lmforge_train_step", "optimizer steps done"),
    "loss": ("lmforge_train_loss", "training loss (nats/token) of the last step"),
    "lr": ("lmforge_train_learning_rate", "learning rate of the last step"),
    "grad_norm": ("lmforge_train_grad_norm", "global gradient norm before clipping"),
    "tokens_per_s": ("lmforge_train_tokens_per_second", "tokens per second over all workers"),
    "mfu": ("lmforge_train_mfu", "model FLOPs utilisation (0..1)"),
    "memory_gib": ("lmforge_train_memory_gib", "peak device (or host) memory of rank 0, GiB"),
    "eta_s": ("lmforge_train_eta_seconds", "estimated seconds to the last step"),
    "val_loss": ("lmforge_train_val_loss", "validation loss (nats/token)"),
    "val_bpb": ("lmforge_train_val_bits_per_byte", "validation bits per byte"),
}
RAY_PREFIX = "ray_"


def exported_names() -> set[str]:
    """The names Prometheus sees (with Ray's prefix)."""
    return {RAY_PREFIX + name for name, _ in GAUGES.values()}


class TrainGauges:
    """Gauges created on first use; `factory` is `ray.util.metrics.Gauge` (a fake in tests)."""

    def __init__(self, run: str, factory=None) -> None:
        if factory is None:
            from ray.util.metrics import Gauge as factory
        self.run, self.factory, self.gauges = run, factory, {}

    def update(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if key not in GAUGES or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key not in self.gauges:
                name, description = GAUGES[key]
                self.gauges[key] = self.factory(name, description=description, tag_keys=("run",))
            self.gauges[key].set(float(value), tags={"run": self.run})


def phase(env: WorkerEnv, output: str, name: str) -> None:
    """Rank 0's progress through a run, in its timings.jsonl (`stage.record_phase`)."""
    if env.rank == 0:
        record_phase(output, name, who="rank0")


class MetricsLog:
    """Rank 0 appends to `metrics.jsonl`, logs to the tracker, sets the gauges and prints."""

    def __init__(self, env: WorkerEnv, run: Run, start_step: int) -> None:
        self.env, self.run = env, run
        self.path = storage.join(run.spec.output, "metrics.jsonl")
        self.lines: list[str] = []  # what the file holds, for stores that cannot append
        self.tracker: tracking.Tracker = tracking.Tracker()
        self.tracked_through = -1  # the last step the tracker has (from an earlier attempt)
        if env.rank == 0:
            self._resume_file(start_step)
            self.tracker = tracking.reopen_in_background(run.spec.output, say=self.say)
        self.start_step, self.seconds, self.interval = start_step, 0.0, []
        self.gauges: TrainGauges | None = None
        arch, plan, dims = run.arch, run.plan, run.dims
        # the rows of a step are split over the data-parallel ranks only (tp/pp/cp share theirs)
        workers = f"{env.world_size} worker(s)"
        if dims.dp != env.world_size:
            model_parallel = f"tp {dims.tp} x pp {dims.pp} x cp {dims.cp}"
            workers = f"{dims.dp} data-parallel worker(s) (of {env.world_size}: {model_parallel})"
        self.say(
            f"{arch.n_layers} layers, D={arch.dim}, {run.flops_per_token / 1e6:.1f} MFLOP/token; "
            f"{workers} x {plan.micro_batch_size} seqs x {plan.accum_steps} "
            f"accum = {plan.global_batch_tokens} tokens/step; {run.total_steps} steps; "
            f"peak {run.peak_tflops:.3g} TFLOP/s per device from {run.peak_source}"
        )
        precision = "bf16" if run.bf16 else "fp32"
        self.say(f"precision {precision} ({run.precision_reason})")
        self.tracker.log_params(
            {
                "device": env.device.type,
                "device_name": device_name(env.device),
                "precision": precision,
                "workers": env.world_size,
                "global_batch_tokens": plan.global_batch_tokens,
                "total_steps": run.total_steps,
                "peak_tflops_per_device": f"{run.peak_tflops:.4g}",
            }
        )

    def _resume_file(self, start_step: int) -> None:
        """Keep the lines up to the step the run resumes from (none for a fresh start: a
        failed attempt without a checkpoint starts over); the lines after it, lost with the
        attempt that wrote them, are written again by this one."""
        if not storage.exists(self.path):
            return
        old = [ln for ln in storage.read_text(self.path).splitlines() if ln]
        steps = [json.loads(ln).get("step", 0) for ln in old]
        self.tracked_through = max(steps, default=-1)
        self.lines = [
            ln for ln, s in zip(old, steps, strict=True) if start_step > 0 and s <= start_step
        ]
        if len(self.lines) != len(old):
            storage.write_text(self.path, "".join(ln + "\n" for ln in self.lines))

    def say(self, text: str) -> None:
        if self.env.rank == 0:
            # Under Ray Train, print() is teed to a logger and stdout (twice on the console).
            out = sys.__stdout__ if self.env.in_ray and sys.__stdout__ else sys.stdout
            print(f"[train] {text}", file=out, flush=True)

    def add_step_time(self, seconds: float) -> None:
        self.interval.append(seconds)
        self.seconds += seconds

    def mfu(self, tokens_per_s: float) -> float | None:
        run = self.run
        return mfu(tokens_per_s, run.flops_per_token, run.peak_tflops * self.env.world_size)

    def train_metrics(self, step: int, loss: float, lr: float, grad_norm: float) -> dict[str, Any]:
        batch_tokens = self.run.plan.global_batch_tokens
        tps = len(self.interval) * batch_tokens / max(sum(self.interval), 1e-9)
        per_step = self.seconds / max(1, step - self.start_step)
        self.interval = []
        return {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step * batch_tokens,
            "tokens_per_s": tps,
            "mfu": self.mfu(tps),
            "memory_gib": memory_gib(self.env.device),
            "eta_s": per_step * (self.run.total_steps - step),
        }

    def write(self, metrics: dict[str, Any]) -> None:
        if self.env.rank != 0 or not metrics:
            return
        line = json.dumps({"time": round(time.time(), 3), **metrics})
        if storage.is_local(self.path):
            local = storage.local_path(self.path)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "a") as f:
                f.write(line + "\n")
        else:  # an object store cannot append: the file is rewritten whole
            self.lines.append(line)
            storage.write_text(self.path, "\n".join(self.lines) + "\n")
        step = metrics.get("step", 0)
        if step > self.tracked_through:
            self.tracker.log_metrics(tracking.numeric(metrics), step=step)
        if self.env.in_ray:  # Prometheus, for the Grafana dashboard
            if self.gauges is None:
                self.gauges = TrainGauges(self.run.spec.output.rstrip("/").rsplit("/", 1)[-1])
            self.gauges.update(metrics)
        self.say(console_line(metrics, self.run.total_steps))

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        self.tracker.close()  # the stage runner logs the outputs and finishes the run
        run = self.run
        steps = run.total_steps - self.start_step
        tps = steps * run.plan.global_batch_tokens / max(self.seconds, 1e-9)
        return {
            "steps": run.total_steps,
            "steps_this_run": steps,
            "tokens": run.total_steps * run.plan.global_batch_tokens,
            "tokens_per_s": tps,
            "train_seconds": self.seconds,
            "mfu": self.mfu(tps),
            "peak_tflops_per_device": run.peak_tflops,
            "peak_source": run.peak_source,
            "flops_per_token": run.flops_per_token,
            "precision": "bf16" if run.bf16 else "fp32",
            **{k: last[k] for k in ("loss", "val_loss", "val_bpb") if k in last},
        }


# metrics.jsonl key -> its console format
CONSOLE = {
    "loss": ".4f",
    "val_loss": ".4f",
    "val_bpb": ".4f",
    "lr": ".2e",
    "grad_norm": ".3f",
    "tokens_per_s": ",.0f",
    "memory_gib": ".2f",
}


def console_line(metrics: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {metrics['step']}/{total_steps}"]
    parts += [f"{key} {metrics[key]:{fmt}}" for key, fmt in CONSOLE.items() if key in metrics]
    if metrics.get("mfu") is not None:  # None: over 100%, a wrong peak (train/mfu.py)
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    if "eta_s" in metrics:
        parts.append(f"eta {metrics['eta_s']:.0f}s")
    return " | ".join(parts)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)
