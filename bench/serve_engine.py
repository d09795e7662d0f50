"""The engine alone (no HTTP): output tokens/s and inter-token latency at several concurrencies,
with decode steps replayed from CUDA graphs and eager (the path without them) in the same run.

    python bench/serve_engine.py [--preset 1b] [--device cuda] [--dtype bfloat16]
        [--clients 1,16,64] [--seconds 10] [--max-tokens 128] [--modes graphs,eager]

`clients` requests are always in flight: when one finishes, the next is submitted, as closed-
loop clients would. The engine gets one KV cache slot per client. Inter-token latency is the
time between two consecutive tokens of one request (p50 and p99 over every request in the
window). Before the timings, a check: greedy tokens with CUDA graphs equal eager ones.

Random-init weights (throughput does not depend on them); needs only torch, tokenizers and
pyarrow, so it runs on a bare GPU box. On a CPU, `--preset tiny --seconds 1` is a quick run
(tests/serve/test_engine_bench.py). Prints a table; writes JSON to
bench/results/serve_engine.json (and $OUT/serve_engine.json when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

import torch  # noqa: E402

from lmforge.data.tokenizer import train_bpe  # noqa: E402
from lmforge.model import Llama, model_config  # noqa: E402
from lmforge.model.generate import SamplingParams  # noqa: E402
from lmforge.serve.engine import Engine, Request  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def measure(engine: Engine, prompts, clients: int, seconds: float, max_tokens: int) -> dict:
    """Closed-loop clients for `seconds` (after a short warm-up); in-flight work is then
    cancelled, so only tokens produced inside the window count."""
    rng = random.Random(0)
    counts = {"tokens": 0, "requests": 0}
    gaps: list[float] = []  # seconds between consecutive tokens of one request
    live: dict = {}
    accepting = [True]

    def submit() -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=rng.randrange(10**6))
        params.stop_token_ids = ()  # fixed-length answers: every request costs the same
        last = [None]

        def on_output(out) -> None:
            if out.finish_reason == "cancelled":
                live.pop(request.id, None)
                return
            now = time.perf_counter()
            if out.tokens:
                if last[0] is not None:
                    gaps.append(now - last[0])
                last[0] = now
            counts["tokens"] += len(out.tokens)
            if out.finish_reason is not None:
                live.pop(request.id, None)
                counts["requests"] += 1
                if accepting[0]:
                    submit()

        request = Request(rng.choice(prompts), params, on_output)
        live[request.id] = request
        engine.submit(request)

    def run_for(duration: float) -> tuple[dict, float]:
        counts.update(tokens=0, requests=0)
        gaps.clear()
        accepting[0] = True
        for _ in range(clients):
            submit()
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed, snapshot = time.perf_counter() - start, dict(counts)
        accepting[0] = False
        for request in list(live.values()):
            engine.cancel(request)
        while engine.running or engine.waiting:
            engine.step()
        return snapshot, elapsed

    run_for(min(3.0, seconds))  # warm-up: kernels, allocator, CUDA graph capture
    got, elapsed = run_for(seconds)
    return {
        "output_tokens_per_s": got["tokens"] / elapsed,
        "requests_per_s": got["requests"] / elapsed,
        "itl_p50_ms": 1e3 * percentile(gaps, 50),
        "itl_p99_ms": 1e3 * percentile(gaps, 99),
        "itl_mean_ms": 1e3 * statistics.fmean(gaps) if gaps else float("nan"),
        "seconds": elapsed,
    }


def greedy_tokens(engine: Engine, prompts, max_tokens: int) -> list[list[int]]:
    results = []
    for prompt in prompts:
        outs: list = []
        params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=())
        engine.submit(Request(list(prompt), params, outs.append))
        results.append(outs)
    while engine.running or engine.waiting:
        engine.step()
    return [[t for o in outs for t in o.tokens] for outs in results]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--clients", default="1,16,64", help="comma-separated concurrencies")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--modes", default=None, help="graphs,eager (default: both on CUDA)")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="KV cache slot length")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    modes = (args.modes or ("graphs,eager" if cuda else "eager")).split(",")
    concurrencies = [int(c) for c in args.clients.split(",")]
    words = Path(__file__).read_text().split()
    tok = train_bpe([" ".join(words[i : i + 40]) for i in range(0, len(words), 5)], 2048, 1)
    cfg = model_config(args.preset, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Llama(cfg).to(getattr(torch, dtype)).eval()
    model.reset_rope()  # the rotary table stays fp32 whatever the weights' dtype
    prompts = [tok.encode(" ".join(words[i : i + 30])).ids[:48] for i in range(0, 600, 37)]
    prompts = [p for p in prompts if p]

    def engine(mode: str, slots: int) -> Engine:
        return Engine(
            model,
            tok,
            max_batch_size=slots,
            max_waiting=10**6,
            max_seq_len=min(args.max_seq_len, cfg.max_seq_len),
            cuda_graphs=mode == "graphs",
        )

    checks = {}
    rows: dict[str, dict] = {}
    with torch.inference_mode():
        if "graphs" in modes and "eager" in modes:
            sample = prompts[:8]
            same = greedy_tokens(engine("graphs", 8), sample, 32)
            ref = greedy_tokens(engine("eager", 8), sample, 32)
            checks["graphs_equal_eager_greedy"] = sum(
                a == b for a, b in zip(same, ref, strict=True)
            ) / len(ref)
        for clients in concurrencies:
            for mode in modes:
                e = engine(mode, clients)
                rows[f"{mode} c={clients}"] = measure(
                    e, prompts, clients, args.seconds, args.max_tokens
                )
                rows[f"{mode} c={clients}"].update(mode=mode, clients=clients)
                del e
                if cuda:
                    torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"preset {args.preset} {dtype} on {device}: {args.max_tokens} tokens per request")
    print(f"{'run':<14} {'tok/s':>9} {'req/s':>8} {'ITL p50 ms':>11} {'ITL p99 ms':>11}")
    for name, r in rows.items():
        print(
            f"{name:<14} {r['output_tokens_per_s']:>9.1f} {r['requests_per_s']:>8.2f} "
            f"{r['itl_p50_ms']:>11.2f} {r['itl_p99_ms']:>11.2f}"
        )
    for clients in concurrencies:
        if "graphs" in modes and "eager" in modes:
            g, e = rows[f"graphs c={clients}"], rows[f"eager c={clients}"]
            ratio = g["output_tokens_per_s"] / e["output_tokens_per_s"]
            print(f"c={clients}: CUDA graphs / eager = {ratio:.2f}x")
    for name, value in checks.items():
        print(f"check {name}: {value:.2f}")
    result = {
        "config": vars(args),
        "dtype": dtype,
        "device": device,
        "results": rows,
        "checks": checks,
    }
    text = json.dumps(result, indent=2) + "\n"
    out = Path(__file__).parent / "results" / "serve_engine.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "serve_engine.json").write_text(text)


if __name__ == "__main__":
    main()
