"""What durable feedback costs: `POST /v1/feedback` posts/s and p50/p99 latency with
`request_log.durable_feedback` on (fsynced journal, group commit) and off (in-memory buffer),
in the same run, and what each keeps when the server is SIGKILLed.

    .venv/bin/python bench/feedback_durability.py [--clients 8] [--seconds 10] [--rounds 2]

Each configuration runs the API (no model: the feedback route needs none) under uvicorn in its
own process on a fresh log dir, with the default flush triggers (1000 rows, 60 s). Clients
loop on keep-alive connections for `--seconds`; then the server is SIGKILLed, a new request
log on the same dir replays the journal, and the rows on disk are counted against the rows
acknowledged `stored: true`. Rounds alternate durable/buffered. A second table times the store
alone (`RequestLog.record_feedback` from the same number of threads, no HTTP): the cost of the
fsync and what group commit saves of it. Prints both tables and writes
bench/results/feedback_durability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2

RESULTS = Path(__file__).parent / "results" / "feedback_durability.json"


def serve(log_dir: str, port: int, durable: bool) -> None:
    """The server process: the API over no model, its request log at `log_dir`."""
    import uvicorn

    from lmforge.serve.config import ServeArgs
    from lmforge.serve.openai import create_app

    args = ServeArgs(
        models=[{"name": "none", "artifact": "unused"}],
        request_log={"path": log_dir, "durable_feedback": durable},
        drift={"sample_rate": 0},
    )
    app = create_app({}, args)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start(log_dir: str, durable: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mode = "durable" if durable else "buffered"
    cmd = [sys.executable, __file__, "--serve", mode, "--log", log_dir, "--port", str(port)]
    env = {**os.environ, "LMFORGE_API_KEYS": ""}
    server = subprocess.Popen(cmd, env=env)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the {mode} server exited with {server.returncode}")
        try:
            if httpx2.get(f"{base}/health", timeout=1).status_code == 200:
                return server, base
        except httpx2.HTTPError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the {mode} server did not start in 120 s")


def load(base: str, clients: int, seconds: float) -> tuple[list[float], list[str], int]:
    """Latencies and ids of the posts acknowledged `stored: true`, and the errors."""
    latencies, acked, errors, lock = [], [], [0], threading.Lock()
    end = time.monotonic() + seconds

    def client(k: int) -> None:
        with httpx2.Client(base_url=base, timeout=30) as http:
            i = 0
            while time.monotonic() < end:
                body = {"completion_id": f"chatcmpl-{k}-{i}", "rating": 1, "tags": ["bench"]}
                t0 = time.perf_counter()
                answer = http.post("/v1/feedback", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if answer.status_code == 200 and answer.json()["stored"]:
                        latencies.append(dt)
                        acked.append(answer.json()["id"])
                    else:
                        errors[0] += 1
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, acked, errors[0]


def measure(durable: bool, clients: int, seconds: float) -> dict:
    from lmforge.serve.logreader import read_log
    from lmforge.serve.requestlog import RequestLog

    log_dir = tempfile.mkdtemp(prefix="lmforge-feedback-bench-")
    server, base = start(log_dir, durable)
    load(base, clients, 1.0)  # warm up: connections, first files
    t0 = time.perf_counter()
    latencies, acked, errors = load(base, clients, seconds)
    elapsed = time.perf_counter() - t0
    server.send_signal(signal.SIGKILL)
    server.wait()
    RequestLog(log_dir, replica="bench", durable_feedback=durable).close()  # replays a journal
    on_disk = set(read_log(log_dir, "feedback")["feedback_id"].to_pylist())
    q = statistics.quantiles(latencies, n=100)
    return {
        "mode": "durable" if durable else "buffered",
        "posts_per_s": len(latencies) / elapsed,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "acked": len(acked),
        "acked_on_disk_after_sigkill": len(on_disk & set(acked)),
        "errors": errors,
    }


def store_only(durable: bool, threads: int, seconds: float) -> dict:
    """record_feedback from `threads` threads for `seconds`: rows/s, p50/p99, fsyncs."""
    from lmforge.serve.requestlog import RequestLog, utcnow

    log = RequestLog(tempfile.mkdtemp(prefix="lmforge-feedback-bench-"), durable_feedback=durable)
    real_fsync, fsyncs = os.fsync, [0]

    def counted(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    os.fsync = counted
    latencies, end = [[] for _ in range(threads)], time.monotonic() + seconds

    def store(k: int) -> None:
        i = 0
        while time.monotonic() < end:
            row = {"feedback_id": f"fb-{k}-{i}", "completion_id": "c", "time": utcnow()}
            t0 = time.perf_counter()
            log.record_feedback({**row, "rating": 1.0, "tags": ["bench"]})
            latencies[k].append(time.perf_counter() - t0)
            i += 1

    workers = [threading.Thread(target=store, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed, os.fsync = time.perf_counter() - t0, real_fsync
    log.close()
    every = [x for per in latencies for x in per]
    q = statistics.quantiles(every, n=100)
    return {
        "mode": "durable" if durable else "buffered",
        "rows_per_s": len(every) / elapsed,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "rows_per_fsync": len(every) / fsyncs[0] if fsyncs[0] else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", choices=["durable", "buffered"], help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.log, args.port, args.serve == "durable")
    runs = [
        measure(durable, args.clients, args.seconds)
        for _ in range(args.rounds)
        for durable in (True, False)
    ]
    print(f"{'mode':<9} {'posts/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'acked':>6} {'kept':>6}")
    for r in runs:
        print(
            f"{r['mode']:<9} {r['posts_per_s']:>8.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
            f"{r['acked']:>6} {r['acked_on_disk_after_sigkill']:>6}"
        )
    median = {
        mode: {
            key: statistics.median(r[key] for r in runs if r["mode"] == mode)
            for key in ("posts_per_s", "p50_ms", "p99_ms")
        }
        for mode in ("durable", "buffered")
    }
    ratio = median["durable"]["posts_per_s"] / median["buffered"]["posts_per_s"]
    print(f"durable/buffered posts/s (medians): {ratio:.2f}")
    stores = [store_only(durable, args.clients, args.seconds / 2) for durable in (True, False)]
    print(f"\nstore only: {'mode':<9} {'rows/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'rows/fsync':>10}")
    for r in stores:
        per_fsync = f"{r['rows_per_fsync']:.1f}" if r["rows_per_fsync"] else "-"
        print(
            f"            {r['mode']:<9} {r['rows_per_s']:>8.0f} {r['p50_ms']:>7.2f} "
            f"{r['p99_ms']:>7.2f} {per_fsync:>10}"
        )
    os.makedirs(RESULTS.parent, exist_ok=True)
    summary = {"clients": args.clients, "seconds": args.seconds, "runs": runs, "median": median}
    summary["store_only"] = stores
    RESULTS.write_text(json.dumps({**summary, "throughput_ratio": ratio}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
