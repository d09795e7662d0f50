"""What the hardware decides for a training run: the compute precision and the peak for MFU.

Decided once, before any worker starts: by the driver for a Ray run (`decide`, with the
workers' device kind and thread count), in-process for `run_local`. Every rank then uses the
same precision, and the same peak unless it runs on another CPU model (then it probes its own,
once per node, through the cache in `lmforge.train.mfu.cpu_peak`).

`precision: auto` is bf16 on GPUs; on CPU it is bf16 only where bf16 matmuls measure faster
than fp32 (a native kernel such as AMX), else fp32: without one, bf16 is emulated and slower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from lmforge.train.mfu import cpu_model, cpu_peak, peak_tflops

# bf16 must beat fp32 by this much on CPU: autocast adds casts that a matmul probe does not see.
BF16_MIN_SPEEDUP = 1.2


@dataclass
class Hardware:
    bf16: bool
    precision_reason: str
    peak_tflops: float
    peak_source: str
    where: str  # the CPU model and threads (or GPU) the peak was measured on

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_precision(precision: str, device_type: str, threads: int) -> tuple[bool, str]:
    """(bf16?, why) for `train.precision` on this device kind and thread count."""
    if precision != "auto":
        return precision == "bf16", f"{precision}, as configured"
    if device_type == "cuda":
        return True, "auto: bf16 on GPU"
    bf16, _ = cpu_peak(torch.bfloat16, threads)
    fp32, _ = cpu_peak(torch.float32, threads)
    ratio = bf16 / fp32
    if ratio >= BF16_MIN_SPEEDUP:
        return True, f"auto: bf16 matmuls run {ratio:.2f}x fp32 on this CPU"
    return False, (
        f"auto: bf16 matmuls run {ratio:.2f}x fp32 on this CPU ({threads} threads; no native "
        f"bf16 kernel such as AMX), so fp32"
    )


def decide(train_cfg, device: torch.device, threads: int | None = None) -> Hardware:
    """Precision and peak for `train_cfg` (a LoopConfig) on `device` with `threads` CPU threads."""
    threads = threads or torch.get_num_threads()
    bf16, why = choose_precision(train_cfg.precision, device.type, threads)
    dtype = torch.bfloat16 if bf16 else torch.float32
    if device.type == "cpu" and not train_cfg.peak_tflops:
        peak, source = cpu_peak(dtype, threads)
    else:
        peak, source = peak_tflops(device, dtype, train_cfg.peak_tflops)
    return Hardware(bf16, why, peak, source, _where(device, threads))


def for_worker(decided: dict[str, Any] | None, train_cfg, device: torch.device) -> Hardware:
    """The driver's decision; the peak re-measured (cached per node) on another CPU model."""
    if not decided:
        return decide(train_cfg, device)
    hw = Hardware(**decided)
    if device.type == "cpu" and not train_cfg.peak_tflops:
        here = _where(device, torch.get_num_threads())
        if here != hw.where:
            dtype = torch.bfloat16 if hw.bf16 else torch.float32
            hw.peak_tflops, hw.peak_source = cpu_peak(dtype, torch.get_num_threads())
            hw.where = here
    return hw


def _where(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {threads} threads"
