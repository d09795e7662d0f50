"""CPU training throughput of `precision: auto` vs bf16 vs fp32, and the MFU the run reports
beside an independent figure, in one run.

Each precision trains the same config in this process (`run_local`: no Ray), `--repeats` times
interleaved, best tokens/s kept (the machine may be shared). The independent MFU is
tokens/s x FLOPs/token over a matmul peak measured here apart from lmforge's probe: a fixed
square size (2048 for fp32, as the issue's reference figure; for bf16 the best of 128, 256 and
`--bf16-size`, since an emulated bf16 matmul runs slower as it grows and one of 2048 can take
minutes), same threads, best of 0.1 s windows.
Writes bench/results/train_precision.json and prints a table.

    .venv/bin/python bench/train_precision.py [--steps 8] [--preset debug]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.loop import run_local  # noqa: E402
from lmforge.train.mfu import best_matmul_rate  # noqa: E402


def matmul_peak(dtype: torch.dtype, size: int, seconds: float = 2.0) -> float:
    """TFLOP/s of a fixed square matmul: the best of 0.1 s windows over `seconds`."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    return best_matmul_rate(a, b, seconds, window=0.1)


def config(data: str, runs: str, args, precision: str) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": f"bench-{precision}", "runs_dir": runs, "model": {"preset": args.preset},
        "data": {"path": data}, "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {"global_batch_tokens": args.global_batch_tokens, "micro_batch_size": args.micro_batch,
                  "max_steps": args.steps, "log_every": args.steps, "eval_every": 0,
                  "eval_sequences": 8, "precision": precision},
        "checkpoint": {"every_steps": 0}, "resources": {"num_workers": 1}, "parallel": {"fsdp": False},
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--global-batch-tokens", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16-size", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_precision.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-precision-"))
    os.environ.setdefault("LMFORGE_HOME", str(work / "home"))  # a fresh peak cache: probe here
    from tests.train.conftest import make_packed_data

    data = str(make_packed_data(work / "data", seq_len=128, vocab_size=1024, rows_per_group=64))
    threads = torch.get_num_threads()
    rows: dict[str, dict] = {}
    for r in range(args.repeats):
        for precision in ("auto", "bf16", "fp32"):
            print(f"[bench] {precision} run {r + 1}/{args.repeats} ...", flush=True)
            s = run_local(
                config(data, str(work / "runs"), args, precision), str(work / f"{precision}{r}")
            )
            if precision not in rows or s["tokens_per_s"] > rows[precision]["tokens_per_s"]:
                rows[precision] = s
    independent = {
        "fp32": matmul_peak(torch.float32, 2048),
        "bf16": max(matmul_peak(torch.bfloat16, n) for n in (128, 256, args.bf16_size)),
    }
    fp32_tps = rows["fp32"]["tokens_per_s"]
    print(f"\n{args.preset} preset, seq 128, {args.global_batch_tokens} tokens/step, "
          f"{args.steps} steps, {threads} threads, torch {torch.__version__}, "
          f"kernels {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    print(
        "| precision | runs as | tokens/s | x fp32 | MFU reported (peak) | MFU independent (peak) |"
    )
    print("|---|---|---|---|---|---|")
    for name, s in rows.items():
        peak = independent[s["precision"]]
        s["ratio_to_fp32"] = s["tokens_per_s"] / fp32_tps
        s["mfu_independent"] = s["tokens_per_s"] * s["flops_per_token"] / (peak * 1e12)
        reported = "none (>100%)" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
        print(f"| {name} | {s['precision']} | {s['tokens_per_s']:,.0f} | {s['ratio_to_fp32']:.2f} "
              f"| {reported} ({1e3 * s['peak_tflops_per_device']:.1f} GFLOP/s) "
              f"| {100 * s['mfu_independent']:.1f}% ({1e3 * peak:.1f} GFLOP/s) |")  # fmt: skip
    report = {
        "preset": args.preset, "steps": args.steps, "threads": threads,
        "torch": torch.__version__, "kernels": torch.backends.cpu.get_cpu_capability(),
        "independent_peak_tflops": independent, "bf16_size": args.bf16_size, "runs": rows,
        "load_average": os.getloadavg(),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
