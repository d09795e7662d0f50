"""Training throughput of the real loop on one device: tokens/s, MFU and a profiler breakdown.

Times `lmforge.train.loop.train_loop` itself, the code every Ray Train worker runs, in this
process: a process group of one (NCCL on GPU, gloo on CPU) with FSDP2 sharding as on many GPUs
(`fsdp_on_one`), bf16 mixed precision, fused AdamW, the background batch prefetch from Parquet
shards (random tokens: throughput does not depend on them) and the loop's host syncs on logging
steps only. No Ray; pydantic builds the `LoopSpec` (bench/gpu_train.sh installs carried wheels
where it is missing).

Per mode (eager, compile): `--warmup` untimed steps (compilation), `--steps` timed steps
(tokens/s over wall time, device synchronised at both ends), then `--profile-steps` steps under
torch.profiler, split into the loop's phases (data, forward, backward, optimizer, sync): host
ms per step (the time the training thread spent in the phase) and device ms per step (kernel
time launched from it; backward's kernels are launched by autograd's thread). The run stops
before its last step, so no checkpoint or export is written. MFU = tokens/s x FLOPs/token
(lmforge.train.mfu.training_flops_per_token) / the peak of the dtype the matmuls run in.
Prints a table; writes JSON to $OUT/gpu_train.json if OUT is set.

    bash bench/gpu_train.sh                                  # 1b, seq 2048, bf16, eager and compile
    python bench/gpu_train.py --device cpu --preset debug --seq-len 64 --micro-batch 2 \\
        --warmup 1 --steps 2 --profile-steps 2 --log-every 2 --modes eager  # the CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd import DeviceType

PHASES = ("data", "forward", "backward", "optimizer", "sync")


class Done(Exception):
    """Raised by the step hook after the profiled steps: the run ends there, unsaved."""


def synthetic_data(root: Path, vocab: int, seq_len: int, rows: int) -> Path:
    """Packed shards as the data stage writes them (tokens (n, seq_len + 1), manifest, _SUCCESS)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = root / "data"
    (data / "train").mkdir(parents=True)
    tokens = np.random.default_rng(0).integers(0, vocab, rows * (seq_len + 1), dtype=np.int64)
    col = pa.FixedSizeListArray.from_arrays(pa.array(tokens.astype(np.uint32)), seq_len + 1)
    pq.write_table(pa.table({"tokens": col}), data / "train" / "part-00000.parquet", 64)
    (data / "manifest.json").write_text(json.dumps({"seq_len": seq_len, "vocab_size": vocab}))
    (data / "_SUCCESS").write_text("{}")
    return data


def process_group(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        **({"device_id": device} if device.type == "cuda" else {}),
    )


def spec_for(args, mode: str, micro_batch: int, data: Path, out: Path):
    from lmforge.train.config import TrainConfig

    total = args.warmup + args.steps + args.profile_steps + 1  # the last never runs
    cfg = TrainConfig.model_validate(
        {
            "name": "bench",
            "runs_dir": str(out),
            "model": {"preset": args.preset},
            "data": {"path": str(data)},
            "train": {
                "global_batch_tokens": micro_batch * args.seq_len,
                "micro_batch_size": micro_batch,
                "max_steps": total,
                "log_every": log_every(args, mode),
                "eval_every": 0,
                "precision": args.precision,
                "peak_tflops": args.peak_tflops,
            },
            "checkpoint": {"every_steps": 0, "resume": False},
            "parallel": {
                "fsdp": True,
                "compile": mode.startswith("compile"),
                "activation_checkpointing": args.activation_checkpointing,
            },
            "resources": {"num_workers": 1},
        }
    )
    run = f"run-{mode.replace('/', '-')}-{micro_batch}"
    return cfg.loop_spec(str(out / run), str(data), workers=1)


def log_every(args, mode: str) -> int:
    """`compile/log1`: compile, logging (so syncing) every step, as the loop did before it
    synced only on logging steps: the cost of a per-step host sync, measured in the same run."""
    _, _, every = mode.partition("/log")
    return int(every) if every else args.log_every


def run_mode(args, mode: str, device: torch.device, data: Path, out: Path) -> dict:
    batch = args.micro_batch
    while True:
        try:
            return measure(args, mode, batch, device, data, out)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        gc.collect()  # out of the except block: its traceback no longer holds the model
        torch.cuda.empty_cache()
        print(f"  out of memory at micro-batch {batch}; retrying with {batch // 2}", flush=True)
        batch //= 2


def measure(args, mode: str, batch: int, device: torch.device, data: Path, out: Path) -> dict:
    from lmforge.train.loop import train_loop
    from lmforge.train.mfu import mfu, peak_tflops, training_flops_per_token
    from lmforge.train.run import WorkerEnv

    spec = spec_for(args, mode, batch, data, out)
    env = WorkerEnv(0, 1, device, in_ray=False)
    timed_from, timed_to = args.warmup, args.warmup + args.steps
    marks: dict[str, float] = {}
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU]
        + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    )

    def on_step(step: int) -> None:
        if step in (timed_from, timed_to):
            sync(device)
            marks[f"at_{step}"] = time.perf_counter()
        if step == timed_from and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if step == timed_to:
            profiler.start()
        if step == timed_to + args.profile_steps:
            sync(device)
            marks["profiled"] = time.perf_counter()
            profiler.stop()
            raise Done

    start = time.perf_counter()
    with contextlib.suppress(Done):
        train_loop(spec, env, on_step=on_step, fsdp_on_one=True)
    seconds = marks[f"at_{timed_to}"] - marks[f"at_{timed_from}"]
    tokens_per_s = args.steps * batch * args.seq_len / seconds
    arch = spec.model.to_llama(vocab_size=args.vocab, seq_len=args.seq_len)
    fpt = training_flops_per_token(arch, args.seq_len)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak, source = peak_tflops(device, dtype, args.peak_tflops)
    result = {
        "mode": mode,
        "micro_batch": batch,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, fpt, peak),
        "step_ms": 1000 * seconds / args.steps,
        "warmup_s": marks[f"at_{timed_from}"] - start,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "peak_tflops": peak,
        "peak_source": source,
        "flops_per_token": fpt,
        "breakdown": breakdown(profiler, args.profile_steps),
        "profiled_step_ms": 1000
        * (marks["profiled"] - marks[f"at_{timed_to}"])
        / args.profile_steps,
        "final_loss": last_loss(Path(spec.output)),
    }
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def breakdown(profiler, steps: int) -> dict[str, dict[str, float]]:
    """Per phase, ms per step: host (the training thread's time in the phase's ranges) and
    device (kernel time launched from them; kernels of the autograd thread count as backward,
    summed over streams, so overlapped communication adds to it)."""
    events = profiler.events()
    main = next((e.thread for e in events if e.name in PHASES), None)
    out = {p: {"host_ms": 0.0, "device_ms": 0.0, "calls": 0} for p in PHASES}
    for e in events:
        if e.device_type != DeviceType.CPU or e.cpu_parent is not None:
            continue  # top-level host ranges only (their children are inside them)
        if e.thread == main and e.name in PHASES:
            out[e.name]["host_ms"] += e.cpu_time_total / 1000
            out[e.name]["device_ms"] += e.device_time_total / 1000
            out[e.name]["calls"] += 1
        elif e.thread != main:  # autograd's thread (the prefetch thread launches no kernels)
            out["backward"]["device_ms"] += e.device_time_total / 1000
    return {
        p: {
            "host_ms": v["host_ms"] / steps,
            "device_ms": v["device_ms"] / steps,
            "calls": v["calls"],
        }
        for p, v in out.items()
    }


def last_loss(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    losses = [json.loads(ln).get("loss") for ln in path.read_text().splitlines()]
    return next((x for x in reversed(losses) if x is not None), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiles)")
    parser.add_argument("--profile-steps", type=int, default=5, help="profiled steps after")
    parser.add_argument("--log-every", type=int, default=10, help="the loop's logging steps")
    parser.add_argument(
        "--modes",
        default="eager,compile",
        help="eager, compile; a /logN suffix logs (and syncs) every N steps, e.g. compile/log1",
    )
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="override the peak table")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.profile_steps < 1:
        parser.error("--warmup, --steps and --profile-steps must each be at least 1")
    for mode in args.modes.split(","):
        if mode.partition("/log")[0] not in ("eager", "compile"):
            parser.error(f"unknown mode {mode!r}: eager or compile, optionally with /logN")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)

    from lmforge.model.llama import num_params
    from lmforge.model.presets import model_config
    from lmforge.train.mfu import cpu_model, training_flops_per_token

    cfg = model_config(args.preset)
    args.vocab = cfg.vocab_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(
        f"{args.preset}: {num_params(cfg) / 1e6:,.0f}M params, seq {args.seq_len}, "
        f"{training_flops_per_token(cfg, args.seq_len) / 1e9:.3f} GFLOP/token, {args.precision}; "
        f"the real train_loop, FSDP2 on a process group of 1; device {name}; "
        f"torch {torch.__version__}",
        flush=True,
    )
    process_group(device)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="lmforge-gpu-train-") as tmp:
            rows = (args.warmup + args.steps + args.profile_steps + 2) * args.micro_batch
            data = synthetic_data(Path(tmp), cfg.vocab_size, args.seq_len, rows)
            for mode in args.modes.split(","):
                print(
                    f"[{mode}] {args.warmup} warm-up steps, {args.steps} timed, "
                    f"{args.profile_steps} profiled...",
                    flush=True,
                )
                results.append(run_mode(args, mode, device, data, Path(tmp)))
                report_mode(results[-1])
    finally:
        dist.destroy_process_group()
    print("\n| mode | micro-batch | tokens/s | MFU | ms/step | max mem GiB | warmup s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
        print(
            f"| {r['mode']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {pct(r['mfu'])} "
            f"| {r['step_ms']:.0f} | {mem} | {r['warmup_s']:.0f} |"
        )
    report = {
        "preset": args.preset,
        "params": num_params(cfg),
        "seq_len": args.seq_len,
        "precision": args.precision,
        "device": name,
        "torch": torch.__version__,
        "results": results,
    }
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "gpu_train.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def report_mode(r: dict) -> None:
    print(
        f"[{r['mode']}] {r['tokens_per_s']:,.0f} tokens/s, MFU {pct(r['mfu'])} "
        f"(peak {r['peak_tflops']:g} TFLOP/s from {r['peak_source']}), "
        f"{r['step_ms']:.0f} ms/step at micro-batch {r['micro_batch']}",
        flush=True,
    )
    print(
        f"[{r['mode']}] profiler breakdown, ms per step (a profiled step took "
        f"{r['profiled_step_ms']:.1f} ms of wall time):"
    )
    print("| phase | host ms | device ms | ranges |")
    print("|---|---|---|---|")
    for phase, v in r["breakdown"].items():
        print(f"| {phase} | {v['host_ms']:.2f} | {v['device_ms']:.2f} | {v['calls']} |")
    print(flush=True)


if __name__ == "__main__":
    main()
