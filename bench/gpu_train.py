"""Single-GPU training throughput of a preset in bf16, eager and torch.compile: tokens/s and MFU.

Needs only torch (run from the repo root with PYTHONPATH=platform; bench/gpu_train.sh does it):
no Ray, no pydantic, no data. The model is lmforge.model.llama, distributed-free, with
lmforge.train.parallelize applying torch.compile per block exactly as training does; bf16
autocast over fp32 master weights, fused AdamW, random tokens (throughput does not depend on
them). MFU = tokens/s x flops_per_token (6 N_matmul + 12 L D T) / the GPU's dense bf16 peak
from lmforge.train.mfu's table. Prints a table; writes JSON to $OUT/gpu_train.json if OUT is set.

    bash bench/gpu_train.sh                 # 1b preset, seq 2048, on the GPU (< 5 min on an H100)
    bash bench/gpu_train.sh --smoke         # tiny preset, 2 steps, on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from lmforge.model.llama import cross_entropy, flops_per_token, num_params
from lmforge.model.presets import model_config
from lmforge.train.mfu import mfu, peak_tflops
from lmforge.train.optim import param_groups
from lmforge.train.parallelize import build_model


def run_mode(args, compile: bool, device: torch.device) -> dict:
    cfg = model_config(args.preset, max_seq_len=max(args.seq_len, 16))
    batch = args.micro_batch
    while True:
        try:
            result = measure(cfg, batch, compile, device, args)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            print(f"  out of memory at micro-batch {batch}; retrying with {batch // 2}", flush=True)
            batch //= 2
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the model of this mode is gone; free its memory
        return result


def measure(cfg, batch: int, compile: bool, device: torch.device, args) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg, device, seed=0, fsdp=False, compile=compile, bf16=True)
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    tokens = torch.randint(0, cfg.vocab_size, (batch, args.seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = cross_entropy(logits, tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    start = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - start
    tps = args.steps * batch * args.seq_len / seconds
    peak, source = peak_tflops(device, torch.bfloat16, args.peak_tflops)
    fpt = flops_per_token(cfg, args.seq_len)
    result = {
        "mode": "compile" if compile else "eager",
        "micro_batch": batch,
        "tokens_per_s": tps,
        "mfu": mfu(tps, fpt, peak),
        "step_ms": 1000 * seconds / args.steps,
        "warmup_s": warmup_s,
        "final_loss": float(loss),
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "peak_tflops": peak,
        "peak_source": source,
    }
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiles)")
    parser.add_argument("--modes", default="eager,compile")
    parser.add_argument("--peak-tflops", type=float, help="override the peak table")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 2 steps (CPU check)")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.seq_len, args.micro_batch, args.steps, args.warmup = "tiny", 64, 2, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = model_config(args.preset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"{args.preset}: {num_params(cfg) / 1e6:,.0f}M params, seq {args.seq_len}, "
        f"{flops_per_token(cfg, args.seq_len) / 1e9:.3f} GFLOP/token; device {name}; torch {torch.__version__}",
        flush=True,
    )
    results = []
    for mode in args.modes.split(","):
        print(
            f"[{mode}] warming up ({args.warmup} steps) and timing {args.steps} steps...",
            flush=True,
        )
        results.append(run_mode(args, mode == "compile", device))
        r = results[-1]
        print(
            f"[{mode}] {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}% "
            f"(peak {r['peak_tflops']:g} TFLOP/s from {r['peak_source']}), "
            f"{r['step_ms']:.0f} ms/step at micro-batch {r['micro_batch']}",
            flush=True,
        )
    print("\n| mode | micro-batch | tokens/s | MFU | ms/step | max mem GiB | warmup s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
        print(
            f"| {r['mode']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% "
            f"| {r['step_ms']:.0f} | {mem} | {r['warmup_s']:.0f} |"
        )
    report = {
        "preset": args.preset,
        "params": num_params(cfg),
        "seq_len": args.seq_len,
        "device": name,
        "torch": torch.__version__,
        "flops_per_token": flops_per_token(cfg, args.seq_len),
        "results": results,
    }
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "gpu_train.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
