"""`stored: true` means durable: `lmforge serve --no-ray` SIGKILLed at random points while 8
clients post feedback, restarted on the same log each time: every acknowledged row is on disk
exactly once. Also: a row the journal cannot take is a 503, never `stored: true`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient

from lmforge.serve.config import ServeArgs
from lmforge.serve.logreader import read_log
from lmforge.serve.openai import local_app
from tests.conftest import free_port


def start_server(artifact: str, log_dir: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("LMFORGE_API_KEYS", None)
    args = [sys.executable, "-m", "lmforge.cli", "serve", "--no-ray", "--model", artifact]
    args += ["--port", str(port), "--torch-threads", "1", "--set", f"request_log.path={log_dir}"]
    # Nothing is compacted on a timer or a count: acknowledged rows are only in the journal.
    args += ["--set", "request_log.flush_seconds=3600", "--set", "request_log.flush_rows=100000"]
    server = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read().decode()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.kill()
    raise AssertionError("lmforge serve did not start in 120 s")


def post_until_killed(port: int, acked: list[str], stop: threading.Event, t: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for i in range(10**6):
            if stop.is_set():
                return
            body = {"completion_id": f"chatcmpl-{t}-{i}", "rating": 1, "tags": [str(t)]}
            try:
                answer = client.post("/v1/feedback", json=body)
            except httpx.HTTPError:
                return  # the server is gone: this post was not acknowledged
            if answer.status_code == 200 and answer.json()["stored"] is True:
                acked.append(answer.json()["id"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_acknowledged_feedback_survives_sigkill_exactly_once(artifact, tmp_path):
    log_dir, rng = str(tmp_path / "log"), random.Random(14)
    acked: list[str] = []
    on_disk_before_restart = []
    for _round in range(2):
        port = free_port()
        server = start_server(artifact, log_dir, port)  # replays the previous round's journal
        stop = threading.Event()
        clients = [
            threading.Thread(target=post_until_killed, args=(port, acked, stop, t))
            for t in range(8)
        ]
        for client in clients:
            client.start()
        # A random point: after a random number of acknowledgements, plus a random delay.
        target, deadline = len(acked) + rng.randint(10, 80), time.monotonic() + 120
        while len(acked) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        server.send_signal(signal.SIGKILL)  # not a graceful stop: no shutdown hook, no atexit
        server.wait(timeout=30)
        stop.set()
        for client in clients:
            client.join(timeout=30)
        on_disk_before_restart.append(read_log(log_dir, "feedback").num_rows)
    server = start_server(artifact, log_dir, free_port())
    try:
        deadline = time.monotonic() + 60
        while read_log(log_dir, "feedback").num_rows < len(acked) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    ids = read_log(log_dir, "feedback")["feedback_id"].to_pylist()
    assert len(acked) > 50 and len(set(acked)) == len(acked)
    missing = set(acked) - set(ids)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged rows lost"
    assert len(ids) == len(set(ids)), "a row is on disk twice"
    # Each restart replayed the journal: after a kill, the newest rows were never in Parquet.
    assert on_disk_before_restart[0] == 0 and on_disk_before_restart[-1] < len(acked)


def test_a_row_the_journal_cannot_take_is_a_503_not_stored(artifact, tmp_path, monkeypatch):
    args = ServeArgs(
        models=[{"name": "tiny", "artifact": artifact}],
        request_log={"path": str(tmp_path), "flush_seconds": 3600},
        drift={"sample_rate": 0},
    )
    app = local_app(args)
    with TestClient(app) as client:
        real = os.fsync

        def disk_full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", disk_full)
        failed = client.post("/v1/feedback", json={"completion_id": "c-1", "rating": 1})
        monkeypatch.setattr(os, "fsync", real)
        assert failed.status_code == 503 and failed.headers["retry-after"] == "1"
        error = failed.json()["error"]
        assert error["code"] == "feedback_not_stored" and "No space left" in error["message"]
        ok = client.post("/v1/feedback", json={"completion_id": "c-2", "rating": -1})
        assert ok.status_code == 200 and ok.json()["stored"] is True
        assert "lmforge_feedback_total" in client.get("/metrics").text
    ids = read_log(str(tmp_path), "feedback")["feedback_id"].to_pylist()
    assert ok.json()["id"] in ids
