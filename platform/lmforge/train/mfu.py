"""Model FLOPs utilisation: the FLOPs a training step executes per second over the peak.

The FLOPs are `training_flops_per_token`: lmforge.model.flops_per_token for full training,
and for LoRA what is executed (frozen weights do a forward and an input-gradient matmul but no
weight gradient). The peak of a GPU comes from a table by device name, in the math mode the
matmuls actually run in: dense (no sparsity) tensor-core bf16/fp16, TF32 (half that) for fp32
matmuls only when TF32 is enabled, else the CUDA-core fp32 peak (the loop leaves torch's
default, TF32 off, so fp32 training is not silently rounded to a 10-bit mantissa). On CPU it is measured: a square matmul in the training dtype and thread count, at a size
where the kernel saturates, probed once per node and cached by CPU model (`cpu_peak`), so CPU
MFU is against what this machine's matmul kernels actually reach, not a datasheet. An MFU over
1 means the peak is wrong: `mfu` never reports one. Torch only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from lmforge.model.llama import LlamaConfig, flops_per_token

# (dense bf16 tensor-core, fp32 CUDA-core) TFLOP/s by a substring of
# torch.cuda.get_device_name(), most specific first, from the vendors' datasheets. TF32
# tensor-core throughput is half the bf16 figure on all of these.
GPU_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("GB200", 2500.0, 80.0),
    ("B200", 2250.0, 80.0),
    ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("H800", 989.0, 67.0),
    ("H20", 148.0, 44.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.0, 82.6),
]


def tf32_enabled() -> bool:
    """Whether fp32 matmuls on CUDA run on TF32 tensor cores (allow_tf32, or
    set_float32_matmul_precision("high"), which sets the same flag)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def gpu_peak_tflops(
    device_name: str, dtype: torch.dtype = torch.bfloat16, tf32: bool | None = None
) -> float | None:
    """Peak TFLOP/s of a GPU by name for matmuls in `dtype`, or None for a GPU not in the table.

    fp32: the TF32 tensor-core peak when `tf32` (None: as torch is set now), else CUDA cores'.
    """
    for key, bf16, fp32 in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            if dtype in (torch.bfloat16, torch.float16):
                return bf16
            return bf16 / 2 if (tf32_enabled() if tf32 is None else tf32) else fp32
    return None


def training_flops_per_token(cfg: LlamaConfig, seq_len: int, lora=None) -> float:
    """FLOPs one training token executes (forward + backward), the numerator of MFU.

    Full training: `flops_per_token` (6 N_matmul + 12 L D T). LoRA (`lora` with `rank` and
    `targets`; every other weight frozen): autograd runs a matmul's input gradient only where
    its input needs a gradient (an adapter upstream), and a frozen weight never gets a weight
    gradient. So a frozen weight costs 2 FLOPs (forward) + 2 (input gradient, when something
    below it trains): 4 per weight, not 6, and 2 in the first block ahead of the first
    adapter; an adapter (A: r x in, B: out x r) costs 6 per weight, less A's input gradient
    where its input needs none; attention's score matmuls 4 T D per layer forward, x3 once q,
    k or v needs a gradient. Walked through the blocks in order, as autograd sees them.
    """
    if lora is None:
        return flops_per_token(cfg, seq_len)
    D, F_, E, r = cfg.dim, cfg.ffn_dim, cfg.head_dim, lora.rank
    targets = set(lora.targets)

    def linear(name: str, n_in: int, n_out: int, in_grad: bool) -> tuple[float, bool]:
        """(FLOPs per token, whether the output needs a gradient) of one linear layer."""
        flops = (4.0 if in_grad else 2.0) * n_in * n_out
        if name in targets:  # A: forward + weight grad (+ input grad); B: all three
            flops += (6.0 if in_grad else 4.0) * r * n_in + 6.0 * r * n_out
        return flops, in_grad or name in targets

    total, stream = 0.0, False  # the frozen embedding's output needs no gradient
    for _ in range(cfg.n_layers):
        fq, gq = linear("wq", D, cfg.n_heads * E, stream)
        fk, gk = linear("wk", D, cfg.n_kv_heads * E, stream)
        fv, gv = linear("wv", D, cfg.n_kv_heads * E, stream)
        scores = gq or gk or gv
        fo, go = linear("wo", cfg.n_heads * E, D, scores)
        stream = stream or go
        f1, g1 = linear("w1", D, F_, stream)
        f3, g3 = linear("w3", D, F_, stream)
        f2, g2 = linear("w2", F_, D, g1 or g3)
        stream = stream or g2
        total += fq + fk + fv + fo + f1 + f3 + f2 + (12.0 if scores else 4.0) * D * seq_len
    head, _ = linear("output", D, cfg.vocab_size, stream)  # the head: never an adapter target
    return total + head


def cpu_matmul_tflops(
    dtype: torch.dtype, seconds: float = 1.0, max_matmul_s: float = 2.0, size: int | None = None
) -> float:
    """Square-matmul TFLOP/s of this process's CPU threads in `dtype`, at a size that saturates.

    The size doubles from 64 while the rate still rises by 10% and one matmul of the next size
    would take under `max_matmul_s` (a small matrix reads low: the kernel's blocking and threads
    are not yet busy; without a native kernel bf16 runs ~30x slower, and the cap keeps the
    probe to seconds).
    At the size with the best rate: the best of short windows, not the mean, because on a shared machine
    other processes steal some windows, and the peak is what the cores reach when they are ours.
    """
    # From 64: an emulated bf16 kernel (no native one) is fastest on small blocks, slower above.
    sizes = [size] if size else [64 * 2**i for i in range(8)]  # 64 .. 8192
    best_rate, chosen = 0.0, sizes[0]
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        start = time.perf_counter()
        a @ b  # warm-up: thread pool, kernel selection, page faults
        took = time.perf_counter() - start
        rate = best_matmul_rate(a, b, min(0.2, seconds))
        if n >= 512 and rate < best_rate * 1.1:  # below 512 timing noise can hide the rise
            break
        if rate > best_rate:
            best_rate, chosen = rate, n
        if took * 8 > max_matmul_s:  # the next size costs 8x
            break
    a, b = torch.randn(chosen, chosen).to(dtype), torch.randn(chosen, chosen).to(dtype)
    return max(best_rate, best_matmul_rate(a, b, seconds))


def best_matmul_rate(
    a: torch.Tensor, b: torch.Tensor, seconds: float, window: float = 0.05
) -> float:
    """TFLOP/s of `a @ b` (square): the best of `window`-second windows over `seconds`."""
    n = a.shape[0]
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        count, start = 0, time.perf_counter()
        while count < 1 or time.perf_counter() - start < window:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e12)
    return best


def cpu_model() -> str:
    """This CPU's model name (the cache key of its peak): /proc/cpuinfo, else the platform's."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_peak(dtype: torch.dtype, threads: int, cache: Path | None = None) -> tuple[float, str]:
    """(peak TFLOP/s of `threads` CPU threads in `dtype`, where it came from), probed once per node.

    Cached in `$LMFORGE_HOME/cpu_peak.json` by CPU model, dtype, threads, torch and kernel
    capability; a file lock makes the ranks of one node wait for one probe and share it. The
    driver probes before any worker starts, so the probe runs on a quiet machine.
    """
    from lmforge.cluster.local import lmforge_home

    path = cache or lmforge_home() / "cpu_peak.json"
    kernels = torch.backends.cpu.get_cpu_capability()
    name = str(dtype).removeprefix("torch.")
    key = f"{cpu_model()} | {name} | {threads} threads | torch {torch.__version__} | {kernels}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one probe per node; the others wait for it
        known = json.loads(path.read_text()) if path.exists() else {}
        if key not in known:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                known[key] = cpu_matmul_tflops(dtype)
            finally:
                torch.set_num_threads(before)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
            tmp.replace(path)
            source = "cpu matmul probe"
        else:
            source = f"cpu matmul probe cached in {path}"
    return known[key], f"{source} ({name}, {threads} threads, {kernels})"


def peak_tflops(
    device: torch.device, dtype: torch.dtype, override: float | None = None
) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from), for the log line that states the peak used."""
    if override:
        return override, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name, dtype)
        if peak is not None:
            mode = "bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32"
            if mode == "fp32":
                mode += ", TF32 tensor cores" if tf32_enabled() else ", CUDA cores (TF32 off)"
            return peak, f"table ({name}, {mode})"
        # An unknown GPU: a probe is better than no MFU at all.
        a = torch.randn(4096, 4096, device=device, dtype=dtype)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize(device)
        start, n = time.perf_counter(), 20
        for _ in range(n):
            a @ a
        torch.cuda.synchronize(device)
        return 2 * 4096**3 * n / (time.perf_counter() - start) / 1e12, f"matmul probe ({name})"
    return cpu_peak(dtype, torch.get_num_threads())


class MfuAboveOne(ValueError):
    """An MFU over 1: the peak it divides by is wrong (too low), never a fast run."""


def mfu(tokens_per_second: float, flops_per_token: float, peak_tflops_total: float) -> float | None:
    """Fraction of the peak: tokens/s x FLOPs/token / (peak per device x devices).

    Over 1 is a bug in the peak: None (no figure rather than a false one), and with
    LMFORGE_STRICT_MFU=1 (the test suite) an error.
    """
    value = tokens_per_second * flops_per_token / (peak_tflops_total * 1e12)
    if value <= 1.0:
        return value
    message = (
        f"MFU {100 * value:.0f}% is over 100%: the peak {peak_tflops_total:.3g} TFLOP/s is too "
        "low; set train.peak_tflops, or delete the cached CPU peak ($LMFORGE_HOME/cpu_peak.json)"
    )
    if os.environ.get("LMFORGE_STRICT_MFU") == "1":
        raise MfuAboveOne(message)
    warnings.warn(message, stacklevel=2)
    return None
