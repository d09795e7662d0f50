"""Model FLOPs utilisation: model FLOPs per second (lmforge.model.flops_per_token) over the peak.

The peak of a GPU comes from a table of dense (no sparsity) tensor-core throughput by device
name; on CPU it is measured: a short square matmul probe in the training dtype, so CPU MFU is
against what this machine's matmul kernels actually reach, not a datasheet. Torch only.
"""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core TFLOP/s by a substring of torch.cuda.get_device_name(), most specific
# first. fp32 training on these GPUs runs matmuls as TF32: half the bf16 figure.
GPU_PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
]


def gpu_peak_tflops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak TFLOP/s of a GPU by name in a dtype, or None for a GPU not in the table."""
    for key, bf16 in GPU_PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return bf16 if dtype in (torch.bfloat16, torch.float16) else bf16 / 2
    return None


def cpu_matmul_tflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """Square-matmul TFLOP/s of this process's CPU threads in `dtype`: the best of short windows.

    The best window, not the mean: on a shared machine other processes steal time from some
    windows, and the peak is what the cores reach when they are ours.
    """
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):  # warm up: thread pool, kernel selection
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        n, start = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - start < 0.05:
            a @ b
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start) / 1e12)
    return best


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
            return peak, f"table ({name})"
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
    return cpu_matmul_tflops(
        dtype
    ), f"cpu matmul probe ({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads)"


def mfu(tokens_per_second: float, flops_per_token: float, peak_tflops_total: float) -> float:
    """Fraction of the peak: tokens/s x FLOPs/token / (peak per device x devices)."""
    return tokens_per_second * flops_per_token / (peak_tflops_total * 1e12)
