"""Serving under abuse: the attacks of one client with a valid API key, one after another
against a live `lmforge serve --no-ray`, while a normal client with its own key keeps asking.

    .venv/bin/python bench/abuse.py [--quick] [--model ARTIFACT_DIR] [--port 8732]
        [--body-timeout 10] [--only NAME ...]

The server runs with its default limits (but `limits.body_timeout_s`, --body-timeout, so that
the slow-upload attack ends within the run) and two API keys: the attacker's and a normal
client's. During each attack a prober, with the normal key, sends a 4-token completion and a
GET /health every 0.25 s. For each attack this prints: the attack's own responses by status (or
connection errors), the prober's completions by status (all 200 when one key's abuse leaves the
others served), the 5xx count (attack and probes), the slowest normal completion and /health
during the attack (a probe still waiting when the attack ends counts with its time so far), a
normal completion right after the attack (must be 200 within 2 s), and the server process's
RSS (the router: with --no-ray it is one process) before and after. Without --model a random-init model (dim 64, 512-token context) with a small BPE is built
in a temp dir. Writes bench/results/abuse.json. The run is bounded: every attack has a deadline
(about 3 minutes in all; --quick: smaller attacks, under a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx2
from serving import start_and_wait

RESULTS = Path(__file__).parent / "results" / "abuse.json"
KEY = "sk-bench-abuse"  # the attacker's
AUTH = {"Authorization": f"Bearer {KEY}"}
NORMAL_KEY = "sk-bench-normal"  # the prober's, and the request right after each attack
NORMAL_AUTH = {"Authorization": f"Bearer {NORMAL_KEY}"}
MODEL = "bench"
NORMAL = {"model": MODEL, "prompt": "hello world", "max_tokens": 4, "temperature": 0}


def random_artifact(directory: str) -> str:
    import torch

    from lmforge.data.tokenizer import train_bpe
    from lmforge.model import Llama, LlamaConfig
    from lmforge.model.artifact import save_artifact

    text = Path(__file__).read_text().split()
    tok = train_bpe([" ".join(text[i : i + 50]) for i in range(0, len(text), 10)], 512, 1)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        max_seq_len=512,
    )
    torch.manual_seed(0)
    save_artifact(directory, Llama(cfg).state_dict(), cfg, tokenizer_json=tok.to_str())
    return directory


def start_server(model: str, port: int, body_timeout: float) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "lmforge"), "serve", "--model", model, "--no-ray"]
    cmd += ["--port", str(port), "--name", MODEL, "--device", "cpu", "--torch-threads", "1"]
    cmd += ["--set", f"limits.body_timeout_s={body_timeout}"]
    env = {**os.environ, "LMFORGE_API_KEYS": f"{KEY},{NORMAL_KEY}"}
    return start_and_wait(cmd, env, f"http://127.0.0.1:{port}/health")


def rss_mib(pid: int) -> float:
    """Resident memory of the process and its children (MiB), from /proc."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


# ---------------------------------------------------------------- the prober


class Prober:
    """A normal client in its own threads (so that the attacks' client-side work does not delay
    it): a 4-token completion and a /health every `every` s, each timed."""

    def __init__(self, url: str, every: float = 0.25) -> None:
        self.url, self.every = url, every
        self.completions: list[tuple[float, int]] = []
        self.health: list[tuple[float, int]] = []
        self.pending: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(name,), daemon=True)
            for name in ("completions", "health")
        ]

    def start(self) -> Prober:
        for t in self._threads:
            t.start()
        return self

    def _loop(self, name: str) -> None:
        out = getattr(self, name)
        with httpx2.Client(base_url=self.url, headers=NORMAL_AUTH, timeout=180) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                self.pending[name] = start
                try:
                    if name == "health":
                        status = http.get("/health").status_code
                    else:
                        status = http.post("/v1/completions", json=NORMAL).status_code
                except httpx2.HTTPError:
                    status = 0
                self.pending.pop(name, None)
                out.append((time.monotonic() - start, status))
                self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=1)  # one still waiting on the server is left (daemon)

    def slowest(self, name: str) -> float:
        times = [t for t, _ in getattr(self, name)]
        started = self.pending.get(name)
        if started is not None:  # still waiting when the attack ended
            times.append(time.monotonic() - started)
        return max(times, default=float("nan"))


# ---------------------------------------------------------------- the attacks


def statuses(responses) -> list:
    return [
        r.status_code if isinstance(r, httpx2.Response) else type(r).__name__ for r in responses
    ]


async def post_many(url: str, requests: list[tuple[str, dict]], headers=None, timeout=150):
    async with httpx2.AsyncClient(
        base_url=url, headers=headers or AUTH, timeout=timeout, limits=httpx2.Limits()
    ) as http:
        calls = [http.post(path, **kw) for path, kw in requests]
        return statuses(await asyncio.gather(*calls, return_exceptions=True))


def large_seed(q):
    async def run(url):
        body = {**NORMAL, "seed": 2**64, "max_tokens": 8, "temperature": 1.0}
        return await post_many(url, [("/v1/completions", {"json": body})] * (5 if q else 20))

    return run


async def raw_post(url: str, path: str, data: bytes) -> int | str:
    """POST `data` as curl does a large body: `Expect: 100-continue`, the body only once the
    server says 100 Continue; the final status, or the connection error."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Expect: 100-continue\r\n\r\n"
        ).encode()
    )
    try:
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 120)
        if line.startswith(b"HTTP/1.1 100"):
            await reader.readline()  # the blank line after the interim response
            for i in range(0, len(data), 2**20):
                writer.write(data[i : i + 2**20])
                await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 120)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else "closed"
    except (OSError, TimeoutError) as e:
        return type(e).__name__
    finally:
        writer.close()


def big_body(q, path="/v1/completions", mb=50):
    size = (10 if q else mb) * 2**20
    if path == "/tokenize":
        data = b'{"prompt": "' + b"a" * size + b'"}'
    else:
        data = b'{"model": "bench", "max_tokens": 4, "prompt": "' + b"a" * size + b'"}'

    async def run(url):
        return [await raw_post(url, path, data)]

    return run


def as_json(body: dict) -> dict:
    """Request kwargs with the body encoded now, not while the attack is timed."""
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


def long_prompt(q):
    body = as_json({**NORMAL, "prompt": "lorem ipsum " * 300_000})  # 3.6 MB: under 4 MiB

    async def run(url):
        return await post_many(url, [("/v1/completions", body)] * (2 if q else 8))

    return run


def slow_uploads(q, seconds: float):
    async def run(url):
        host, port = url.removeprefix("http://").split(":")
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {2**20}\r\n\r\n"
        ).encode()

        async def one():
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError as e:
                return type(e).__name__
            try:
                writer.write(head)
                await writer.drain()
                end = time.monotonic() + seconds
                line = b""
                while time.monotonic() < end:  # one byte a second until answered or done
                    writer.write(b" ")
                    await writer.drain()
                    try:
                        line = await asyncio.wait_for(reader.readline(), 1.0)
                    except TimeoutError:
                        continue
                    break
                return int(line.split()[1]) if line.startswith(b"HTTP/") else "held"
            except OSError as e:
                return type(e).__name__
            finally:
                writer.close()

        return await asyncio.gather(*(one() for _ in range(40 if q else 140)))

    return run


def fan_out(q):
    async def run(url):
        n_prompts = 16 if q else 64
        body = {"model": MODEL, "prompt": ["once upon a time"] * n_prompts, "n": 8}
        body.update(max_tokens=32, temperature=1.0)
        return await post_many(url, [("/v1/completions", {"json": body})] * 2)

    return run


def lone_surrogate(q):
    # A lone surrogate is valid JSON ("\ud800") but no valid text: put in by hand.
    def body(d: dict) -> dict:
        raw = json.dumps(d).replace('"@"', '"\\ud800"')
        return {"content": raw.encode(), "headers": {"Content-Type": "application/json"}}

    requests = [
        ("/v1/completions", body({"model": MODEL, "max_tokens": 2, "prompt": "@"})),
        ("/v1/chat/completions", body({**NORMAL, "messages": [{"role": "user", "content": "@"}]})),
        ("/tokenize", body({"prompt": "@"})),
        ("/v1/completions", body({**NORMAL, "model": "@"})),
    ]

    async def run(url):
        return await post_many(url, requests)

    return run


def non_ascii_bearer(q):
    async def run(url):
        headers = {"Authorization": "Bearer ключ-ü".encode()}
        async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
            calls = [http.post("/v1/completions", json=NORMAL, headers=headers) for _ in range(4)]
            calls += [http.get("/v1/models", headers=headers)]
            return statuses(await asyncio.gather(*calls, return_exceptions=True))

    return run


def logit_bias_flood(q):
    big = {str(i): 1.0 for i in range(1_000_000)}  # ~13 MB (the issue's)
    small = {str(i): 1.0 for i in range(200_000)}  # ~2.6 MB: under the body limit
    big_data = json.dumps({**NORMAL, "logit_bias": big}).encode()
    small_body = as_json({**NORMAL, "logit_bias": small})

    async def run(url):
        statuses = await post_many(url, [("/v1/completions", small_body)])
        return statuses if q else [*statuses, await raw_post(url, "/v1/completions", big_data)]

    return run


def long_stop_strings(q):
    body = as_json({**NORMAL, "stop": ["x" * 800_000 + str(i) for i in range(4)]})

    async def run(url):
        return await post_many(url, [("/v1/completions", body)] * 2)

    return run


def attacks(quick: bool, body_timeout: float) -> dict:
    return {
        "large seed (2**64)": large_seed(quick),
        "50 MB body": big_body(quick),
        "20 MB /tokenize": big_body(quick, "/tokenize", mb=20),
        "3.6 MB prompt (chars)": long_prompt(quick),
        "slow uploads": slow_uploads(quick, seconds=body_timeout + 3),
        "fan-out prompts x n=8": fan_out(quick),
        "lone surrogate": lone_surrogate(quick),
        "non-ASCII bearer": non_ascii_bearer(quick),
        "logit_bias flood": logit_bias_flood(quick),
        "long stop strings": long_stop_strings(quick),
    }


async def measure(url: str, pid: int, attack, deadline_s: float) -> dict:
    before = rss_mib(pid)
    prober = Prober(url).start()
    await asyncio.sleep(0.5)  # the prober's first round, before the attack
    start = time.monotonic()
    try:
        results = await asyncio.wait_for(attack(url), deadline_s)
    except TimeoutError:
        results = ["deadline"]
    took = time.monotonic() - start
    slowest = {n: prober.slowest(n) for n in ("completions", "health")}
    prober.stop()
    async with httpx2.AsyncClient(base_url=url, headers=NORMAL_AUTH, timeout=30) as http:
        t = time.monotonic()
        after = await http.post("/v1/completions", json=NORMAL)
        after_s = time.monotonic() - t
        health = (await http.get("/health")).status_code
    probe_statuses = [s for _, s in prober.completions + prober.health]
    five = sum(isinstance(s, int) and s >= 500 for s in list(results) + probe_statuses)
    return {
        "attack_statuses": dict(Counter(str(s) for s in results)),
        "attack_seconds": took,
        "5xx": five,
        "normal_statuses": dict(Counter(str(s) for _, s in prober.completions)),
        "slowest_normal_s": slowest["completions"],
        "slowest_health_s": slowest["health"],
        "after_status": after.status_code,
        "after_s": after_s,
        "after_health": health,
        "rss_before_mib": before,
        "rss_after_mib": rss_mib(pid),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="artifact dir (default: a random-init tiny model)")
    parser.add_argument("--port", type=int, default=8732)
    parser.add_argument("--quick", action="store_true", help="smaller attacks: a smoke run")
    parser.add_argument(
        "--body-timeout", type=float, default=10, help="the server's limits.body_timeout_s"
    )
    parser.add_argument("--only", nargs="*", help="run only these attacks (name prefixes)")
    args = parser.parse_args()
    chosen = {
        n: a
        for n, a in attacks(args.quick, args.body_timeout).items()
        if not args.only or any(n.startswith(o) for o in args.only)
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_artifact(f"{tmp}/model")
        server = start_server(model, args.port, args.body_timeout)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for name, attack in chosen.items():
                rows[name] = asyncio.run(measure(url, server.pid, attack, 90))
                r = rows[name]
                print(
                    f"{name:<24} 5xx {r['5xx']:>3}  slowest normal {r['slowest_normal_s']:6.2f} s"
                    f"  /health {r['slowest_health_s']:6.2f} s  after {r['after_status']} in "
                    f"{r['after_s']:.2f} s (/health {r['after_health']})  RSS "
                    f"{r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} MiB  attack "
                    f"{r['attack_statuses']} in {r['attack_seconds']:.1f} s  prober "
                    f"{r['normal_statuses']}",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait(timeout=60)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"config": vars(args), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
