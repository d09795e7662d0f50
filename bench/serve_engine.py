"""The engine alone (no HTTP): output tokens/s with continuous batching vs max batch 1.

    python bench/serve_engine.py [--preset small] [--device cuda] [--dtype bfloat16]
        [--clients 64] [--seconds 20] [--max-tokens 128] [--batch 64]

`clients` requests are always in flight: when one finishes, the next is submitted, as closed-
loop clients would. Random-init weights (throughput does not depend on them); needs only
torch, tokenizers and pyarrow, so it runs on a bare GPU box. Prints a table; writes JSON to
bench/results/serve_engine.json (and $OUT/serve_engine.json when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

import torch  # noqa: E402

from lmforge.data.tokenizer import train_bpe  # noqa: E402
from lmforge.model import Llama, model_config  # noqa: E402
from lmforge.model.generate import SamplingParams  # noqa: E402
from lmforge.serve.engine import Engine, Request  # noqa: E402


def measure(engine: Engine, prompts, clients: int, seconds: float, max_tokens: int) -> dict:
    """Closed-loop clients for `seconds` (after a short warm-up); in-flight work is then
    cancelled, so only tokens produced inside the window count."""
    rng = random.Random(0)
    counts = {"tokens": 0, "requests": 0}
    live: dict = {}
    accepting = [True]

    def submit() -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=rng.randrange(10**6))
        params.stop_token_ids = ()  # fixed-length answers: every request costs the same

        def on_output(out) -> None:
            if out.finish_reason == "cancelled":
                live.pop(request.id, None)
                return
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

    run_for(min(3.0, seconds))  # warm-up: kernels, allocator, caches
    got, elapsed = run_for(seconds)
    return {
        "output_tokens_per_s": got["tokens"] / elapsed,
        "requests_per_s": got["requests"] / elapsed,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    words = Path(__file__).read_text().split()
    tok = train_bpe([" ".join(words[i : i + 40]) for i in range(0, len(words), 5)], 2048, 1)
    cfg = model_config(args.preset, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Llama(cfg).to(getattr(torch, dtype)).eval()
    prompts = [tok.encode(" ".join(words[i : i + 30])).ids[:48] for i in range(0, 600, 37)]
    prompts = [p for p in prompts if p]
    rows = {}
    with torch.inference_mode():
        for name, batch in (("batched", args.batch), ("batch=1", 1)):
            engine = Engine(model, tok, max_batch_size=batch, max_waiting=10**6)
            rows[name] = measure(engine, prompts, args.clients, args.seconds, args.max_tokens)
    ratio = rows["batched"]["output_tokens_per_s"] / rows["batch=1"]["output_tokens_per_s"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"preset {args.preset} {dtype} on {device}: {args.clients} clients, {args.max_tokens} tokens each"
    )
    print(f"{'config':<9} {'tok/s':>9} {'req/s':>8}")
    for name, r in rows.items():
        print(f"{name:<9} {r['output_tokens_per_s']:>9.1f} {r['requests_per_s']:>8.2f}")
    print(f"batched / batch=1: {ratio:.2f}x")
    result = {
        "config": vars(args),
        "dtype": dtype,
        "device": device,
        "results": rows,
        "ratio": ratio,
    }
    text = json.dumps(result, indent=2) + "\n"
    out = Path(__file__).parent / "results" / "serve_engine.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "serve_engine.json").write_text(text)


if __name__ == "__main__":
    main()
