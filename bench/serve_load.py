"""Serving under load: N concurrent streaming clients for T seconds against a live server,
with continuous batching (max batch B) and with batching off (max batch 1), in the same run.

    .venv/bin/python bench/serve_load.py [--model ARTIFACT_DIR] [--clients 16] [--seconds 30]
        [--max-tokens 64] [--batch 16] [--device cpu] [--threads N] [--ray]

Each configuration starts `lmforge serve` in its own process (plain uvicorn, or Ray Serve with
--ray) and waits for /health; clients then loop: one streamed completion after another, a
fixed prompt and max_tokens, temperature 0. Without --model a random-init `tiny` preset
(about 12M parameters) with a small BPE is built in a temp dir: throughput does not depend on
what the weights say. Reports requests/s, output tokens/s, p50/p99 latency and time to first
token, errors, and the batched/unbatched ratio; writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2
from serving import start_and_wait

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
PROMPT = "Ray Serve runs each model in replicas; the engine decodes every running request"


def random_artifact(directory: str, preset: str) -> str:
    import torch

    from lmforge.data.tokenizer import train_bpe
    from lmforge.model import Llama
    from lmforge.model.artifact import save_artifact
    from lmforge.model.presets import model_config

    text = Path(__file__).read_text().split()
    tok = train_bpe([" ".join(text[i : i + 50]) for i in range(0, len(text), 10)], 1024, 1)
    cfg = model_config(preset, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    save_artifact(directory, Llama(cfg).state_dict(), cfg, tokenizer_json=tok.to_str())
    return directory


def start_server(
    model: str, port: int, batch: int, device: str, ray: bool, threads: int | None
) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "lmforge"), "serve", "--model", model]
    cmd += ["--port", str(port), "--name", "bench", "--max-batch-size", str(batch)]
    cmd += ["--device", device, "--max-waiting", "512"]
    # Every load client is the one (keyless) key: no per-key cap.
    cmd += [
        "--set",
        "limits.max_concurrent_requests=512",
        "--set",
        "limits.key_max_concurrent_requests=null",
    ]
    if threads:
        cmd += ["--torch-threads", str(threads)]
    if not ray:
        cmd.append("--no-ray")
    env = {**os.environ, "LMFORGE_API_KEYS": ""}
    return start_and_wait(cmd, env, f"http://127.0.0.1:{port}/v1/models")


async def one_request(http: httpx2.AsyncClient, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first token, output tokens) of one streamed completion."""
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, first or 0.0, tokens


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    stats: dict = {"latency": [], "ttft": [], "tokens": 0, "requests": 0, "errors": 0}
    limits = httpx2.Limits(max_connections=clients * 2)
    async with httpx2.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await one_request(http, 4)  # warm-up
        stop = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                try:
                    latency, ttft, tokens = await one_request(http, max_tokens)
                except Exception:
                    stats["errors"] += 1
                    continue
                stats["latency"].append(latency)
                stats["ttft"].append(ttft)
                stats["tokens"] += tokens
                stats["requests"] += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "requests_per_s": stats["requests"] / elapsed,
        "output_tokens_per_s": stats["tokens"] / elapsed,
        "p50_latency_s": pct(stats["latency"], 50),
        "p99_latency_s": pct(stats["latency"], 99),
        "p50_ttft_s": pct(stats["ttft"], 50),
        "p99_ttft_s": pct(stats["ttft"], 99),
        "requests": stats["requests"],
        "errors": stats["errors"],
        "seconds": elapsed,
    }


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="artifact dir (default: a random-init preset)")
    parser.add_argument("--preset", default="tiny", help="preset of the random model")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="max batch of the batched run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--ray", action="store_true", help="through Ray Serve, not plain uvicorn")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_artifact(f"{tmp}/model", args.preset)
        rows = {}
        for name, batch in (("batched", args.batch), ("batch=1", 1)):
            server = start_server(model, args.port, batch, args.device, args.ray, args.threads)
            try:
                url = f"http://127.0.0.1:{args.port}"
                rows[name] = asyncio.run(load(url, args.clients, args.seconds, args.max_tokens))
            finally:
                server.terminate()
                server.wait(timeout=60)
    ratio = rows["batched"]["output_tokens_per_s"] / max(
        rows["batch=1"]["output_tokens_per_s"], 1e-9
    )
    header = f"{'config':<10} {'req/s':>7} {'tok/s':>8} {'p50 lat':>8} {'p99 lat':>8} {'p50 ttft':>9} {'p99 ttft':>9} {'errors':>6}"
    print(
        f"{args.clients} clients x {args.seconds:g} s, max_tokens {args.max_tokens}, device {args.device}"
    )
    print(header)
    for name, r in rows.items():
        print(
            f"{name:<10} {r['requests_per_s']:>7.2f} {r['output_tokens_per_s']:>8.1f} "
            f"{r['p50_latency_s']:>8.3f} {r['p99_latency_s']:>8.3f} {r['p50_ttft_s']:>9.3f} "
            f"{r['p99_ttft_s']:>9.3f} {r['errors']:>6}"
        )
    print(f"output tokens/s, batched / batch=1: {ratio:.2f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    result = {"config": vars(args), "results": rows, "batched_over_unbatched": ratio}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
