"""Training throughput on CPU: `lmforge train` on Ray Train against a plain PyTorch loop.

Same model (default: the tiny preset), same global batch, same packed data, in one run:

  plain fp32        a single-process loop (model, AdamW, accumulation, clipping), all cores
  plain bf16        the same with bf16 autocast (and on 1 thread: on a busy machine two
                    OpenMP threads can lose to one)
  ray 2w fsdp bf16  `lmforge train`: 2 Ray Train workers x 1 CPU, FSDP2 over gloo, bf16 autocast
  ray 1w bf16       `lmforge train`: 1 Ray Train worker x 2 CPUs, no FSDP (isolates Ray's cost)

Tokens/s count optimizer steps only (every step, the first included, for every row); Ray's
start-up is reported apart as wall time. MFU is against a matmul probe of the same threads in
the same dtype. Also compares `lmforge plan`'s wall-time estimate with the measured run.
Writes bench/results/train_throughput.json and prints a table.

    .venv/bin/python bench/train_throughput.py [--steps 10] [--data RUNS/data/NAME-HASH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmforge.model.llama import Llama, cross_entropy, flops_per_token  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.data import PackedShards, batch_plan, read_manifest  # noqa: E402
from lmforge.train.mfu import cpu_matmul_tflops, mfu  # noqa: E402
from lmforge.train.optim import lr_at, param_groups  # noqa: E402


def train_config(data: str, runs: str, args, **sections) -> TrainConfig:
    cfg = {
        "name": "bench-2w",
        "runs_dir": runs,
        "model": {"preset": args.preset},
        "data": {"path": data},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {
            "global_batch_tokens": args.global_batch_tokens,
            "micro_batch_size": args.micro_batch,
            "max_steps": args.steps,
            "log_every": args.steps,
            "eval_every": 0,
            "eval_sequences": 8,
            "precision": "bf16",
        },
        "checkpoint": {"every_steps": 0},
        "resources": {"num_workers": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(cfg)


def plain_loop(cfg: TrainConfig, bf16: bool, threads: int) -> dict:
    """The baseline: the simplest correct single-process loop over the same rows."""
    torch.set_num_threads(threads)
    manifest = read_manifest(cfg.data.path)
    train = PackedShards(os.path.join(cfg.data.path, "train"), cfg.train.seed, cfg.data.shuffle)
    arch = cfg.model.to_llama(vocab_size=manifest["vocab_size"], seq_len=train.seq_len)
    plan = batch_plan(cfg.train.global_batch_tokens, cfg.train.micro_batch_size, 1, train.seq_len)
    torch.manual_seed(cfg.train.seed)
    model = Llama(arch)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=cfg.optim.lr, betas=(0.9, 0.95))
    seconds, losses = 0.0, []
    for step in range(cfg.train.max_steps):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg.optim, step, cfg.train.max_steps)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(plan.accum_steps):
            first, count = plan.micro_rows(step, 0, micro)
            rows = torch.from_numpy(train.rows(first, count))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(rows[:, :-1])
            loss = cross_entropy(logits, rows[:, 1:]) / plan.accum_steps
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seconds += time.perf_counter() - start
        losses.append(total)
    tokens = cfg.train.max_steps * plan.global_batch_tokens
    return {
        "tokens_per_s": tokens / seconds,
        "train_seconds": seconds,
        "final_loss": losses[-1],
        "flops_per_token": flops_per_token(arch, train.seq_len),
    }


def loop_against_plain(cfg: TrainConfig, work: Path, threads: int, repeats: int) -> dict:
    """lmforge's loop in this process (`run_local`: one worker, no Ray, no FSDP) against the
    plain loop, same model, fp32, threads and rows, interleaved; median tokens/s of each."""
    from lmforge.train.loop import run_local

    one = cfg.model_copy(
        update={
            "resources": cfg.resources.model_copy(update={"num_workers": 1}),
            "parallel": cfg.parallel.model_copy(update={"fsdp": False}),
            "train": cfg.train.model_copy(update={"precision": "fp32", "peak_tflops": 1.0}),
        }
    )
    plain, ours = [], []
    for r in range(repeats):
        torch.set_num_threads(threads)
        plain.append(plain_loop(one, False, threads)["tokens_per_s"])
        torch.set_num_threads(threads)
        ours.append(run_local(one, str(work / f"loop-{r}"))["tokens_per_s"])
    p, o = sorted(plain)[repeats // 2], sorted(ours)[repeats // 2]
    return {"plain_tokens_per_s": plain, "loop_tokens_per_s": ours, "ratio": o / p}


def compile_against_eager(cfg: TrainConfig, work: Path, threads: int, repeats: int) -> dict:
    """`parallel.compile` (torch.compile, inductor on CPU) against eager, lmforge's loop in this
    process, fp32, interleaved: steady tokens/s (the median of the log intervals after the
    first, which holds the compilation) and the first interval's extra seconds (compile time)."""
    import json as _json

    from lmforge.train.loop import run_local

    steps = cfg.train.max_steps
    every = max(1, steps // 5)
    runs: dict[str, list[dict]] = {"eager": [], "compiled": []}
    for r in range(repeats):
        for name, compiled in (("eager", False), ("compiled", True)):
            one = cfg.model_copy(
                update={
                    "resources": cfg.resources.model_copy(update={"num_workers": 1}),
                    "parallel": cfg.parallel.model_copy(
                        update={"fsdp": False, "compile": compiled}
                    ),
                    "train": cfg.train.model_copy(
                        update={"precision": "fp32", "peak_tflops": 1.0, "log_every": every}
                    ),
                }
            )
            torch.set_num_threads(threads)
            out = work / f"{name}-{r}"
            run_local(one, str(out))
            rows = [_json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
            tps = [m["tokens_per_s"] for m in rows if "tokens_per_s" in m]
            steady = sorted(tps[1:])[len(tps[1:]) // 2]
            per_token = 1 / steady
            first_extra = every * cfg.train.global_batch_tokens * (1 / tps[0] - per_token)
            runs[name].append(
                {"steady_tokens_per_s": steady, "first_interval_extra_s": first_extra}
            )
    med = {
        name: {k: sorted(r[k] for r in rs)[repeats // 2] for k in rs[0]}
        for name, rs in runs.items()
    }
    pairs = sorted(
        c["steady_tokens_per_s"] / e["steady_tokens_per_s"]
        for c, e in zip(runs["compiled"], runs["eager"], strict=True)
    )
    return {
        "runs": runs,
        "median": med,
        "pair_ratios": pairs,
        "steady_ratio_compiled_to_eager": pairs[repeats // 2],
        # the first compiled run fills inductor's on-disk cache; the later ones read it
        "cold_compile_s": runs["compiled"][0]["first_interval_extra_s"],
    }


def optimizer_steps(preset: str, threads: int, repeats: int = 20) -> dict[str, float]:
    """Seconds per AdamW step (median) of the for-loop, foreach and fused kernels, interleaved."""
    from lmforge.train.config import ModelConfig
    from lmforge.train.optim import param_groups

    torch.set_num_threads(threads)
    model = Llama(ModelConfig(preset=preset).to_llama(vocab_size=2048, seq_len=256))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kinds = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opts = {
        k: torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, **kw) for k, kw in kinds.items()
    }
    times: dict[str, list[float]] = {k: [] for k in opts}
    for r in range(repeats + 2):
        for k, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            if r >= 2:  # the first two make the state
                times[k].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def ray_run(cfg: TrainConfig) -> dict:
    from lmforge.stage import get_stage, run_stage

    start = time.perf_counter()
    result = run_stage(get_stage("train"), cfg, force=True, quiet=True)
    s = result.summary
    return {
        "tokens_per_s": s["tokens_per_s"],
        "train_seconds": s["train_seconds"],
        "wall_seconds": time.perf_counter() - start,
        "final_loss": s["loss"],
        "mfu_reported": s["mfu"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--global-batch-tokens", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--data", help="a data stage output (default: a generated one, seq 256)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    parser.add_argument("--repeats", type=int, default=3, help="of the loop-vs-plain pairs")
    parser.add_argument("--no-ray", action="store_true", help="only the in-process comparisons")
    parser.add_argument(
        "--compile", action="store_true", help="also parallel.compile against eager, in process"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-train-"))
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(work / "ray_auth_token"))
    if args.data:
        data = args.data
    else:
        from tests.train.conftest import make_packed_data

        data = str(make_packed_data(work / "data", seq_len=256, vocab_size=2048, rows_per_group=64))
    cores = os.cpu_count() or 2
    base = train_config(data, str(work / "runs"), args)
    steps = optimizer_steps(args.preset, 1)
    print("AdamW step ms (1 thread): " + ", ".join(
        f"{k} {1e3 * v:.2f} ({v / steps['for-loop']:.2f}x)" for k, v in steps.items()))  # fmt: skip
    ratio = loop_against_plain(base, work, 1, args.repeats)
    print(f"lmforge loop / plain loop tokens/s (fp32, 1 thread, 1 worker): {ratio['ratio']:.3f} "
          f"(plain {ratio['plain_tokens_per_s']}, loop {ratio['loop_tokens_per_s']})")  # fmt: skip
    compiled = None
    if args.compile:
        compiled = compile_against_eager(base, work, 1, args.repeats)
        med = compiled["median"]
        print(f"torch.compile (inductor, fp32, 1 thread) / eager steady tokens/s: median pair "
              f"ratio {compiled['steady_ratio_compiled_to_eager']:.3f} (pairs "
              f"{', '.join(f'{r:.2f}' for r in compiled['pair_ratios'])}; eager "
              f"{med['eager']['steady_tokens_per_s']:,.0f}, compiled "
              f"{med['compiled']['steady_tokens_per_s']:,.0f}); compiling costs "
              f"{compiled['cold_compile_s']:.1f} s cold (the first run; later runs read "
              "inductor's cache)")  # fmt: skip
    if args.no_ray:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = {"optimizer_step_s": steps, "loop_vs_plain": ratio, "load": os.getloadavg(),
                  "compile_vs_eager": compiled, "command": " ".join(sys.argv)}  # fmt: skip
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    probe = {
        (dtype, t): cpu_matmul_tflops(getattr(torch, dtype), seconds=1.0)
        for dtype in ("float32", "bfloat16")
        for t in sorted({1, cores})
        if torch.set_num_threads(t) is None
    }
    print("matmul probe TFLOP/s:", {f"{d}/{t}thr": round(v, 4) for (d, t), v in probe.items()})
    rows: dict[str, dict] = {}
    plain = [("plain fp32", False, cores), ("plain bf16", True, cores)]
    if cores > 1:  # on a busy machine OpenMP threads can lose to one thread: show both
        plain.append(("plain bf16 1 thread", True, 1))
    for name, bf16, threads in plain:
        print(f"[bench] {name} ...", flush=True)
        r = plain_loop(base, bf16, threads)
        r["mfu"] = mfu(
            r["tokens_per_s"],
            r["flops_per_token"],
            probe[("bfloat16" if bf16 else "float32", threads)],
        )
        rows[name] = r
        print(
            f"[bench] {name}: {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%",
            flush=True,
        )
    fpt = rows["plain bf16"]["flops_per_token"]
    torch.set_num_threads(cores)
    from lmforge.cluster.local import connect

    connect(None)
    print("[bench] ray 2w fsdp bf16 ...", flush=True)
    rows["ray 2w fsdp bf16"] = ray_run(base)
    rows["ray 2w fsdp bf16"]["mfu"] = mfu(
        rows["ray 2w fsdp bf16"]["tokens_per_s"], fpt, 2 * probe[("bfloat16", 1)]
    )
    print("[bench] ray 1w bf16 ...", flush=True)
    one = train_config(data, str(work / "runs"), args, name="bench-1w", resources={"num_workers": 1, "cpus_per_worker": cores},
                       parallel={"fsdp": False}, train={"peak_tflops": probe[("bfloat16", cores)]})  # fmt: skip
    rows["ray 1w bf16"] = ray_run(one)
    rows["ray 1w bf16"]["mfu"] = mfu(
        rows["ray 1w bf16"]["tokens_per_s"], fpt, probe[("bfloat16", cores)]
    )
    ref = rows["plain bf16"]["tokens_per_s"]
    for r in rows.values():
        r["ratio_to_plain_bf16"] = r["tokens_per_s"] / ref
    from lmforge.project.plan import make_plan

    plan = make_plan(
        base.model_copy(
            update={"train": base.train.model_copy(update={"peak_tflops": probe[("bfloat16", 1)]})}
        )
    )
    measured = rows["ray 2w fsdp bf16"]
    estimate = {
        "plan_train_seconds_at_assumed_mfu": plan.wall_hours * 3600,
        "assumed_mfu": plan.assumed_mfu,
        "measured_train_seconds": measured["train_seconds"],
        "measured_mfu": measured["mfu"],
        "plan_train_seconds_at_measured_mfu": plan.wall_hours
        * 3600
        * plan.assumed_mfu
        / measured["mfu"],
    }
    print(
        f"\n{args.preset} preset, seq 256, {args.global_batch_tokens} tokens/step, {args.steps} steps, {cores} cores"
    )
    print("| run | tokens/s | MFU | x plain bf16 | train s | wall s | final loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        wall = f"{r['wall_seconds']:.1f}" if "wall_seconds" in r else "-"
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['ratio_to_plain_bf16']:.2f} "
              f"| {r['train_seconds']:.1f} | {wall} | {r['final_loss']:.4f} |")  # fmt: skip
    print(
        f"plan: {estimate['plan_train_seconds_at_assumed_mfu']:.1f} s at the assumed "
        f"{100 * plan.assumed_mfu:.0f}% MFU; measured {measured['train_seconds']:.1f} s at "
        f"{100 * measured['mfu']:.1f}% MFU (plan at the measured MFU: "
        f"{estimate['plan_train_seconds_at_measured_mfu']:.1f} s)"
    )
    report = {
        "preset": args.preset,
        "steps": args.steps,
        "global_batch_tokens": args.global_batch_tokens,
        "micro_batch_size": args.micro_batch,
        "cores": cores,
        "torch": torch.__version__,
        "matmul_probe_tflops": {f"{d}/{t}": v for (d, t), v in probe.items()},
        "runs": rows,
        "plan": estimate,
        "optimizer_step_s": steps,
        "loop_vs_plain": ratio,
        "load_average": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
