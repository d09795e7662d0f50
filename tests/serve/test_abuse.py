"""Abuse against a live server (uvicorn, no Ray): after each attack, a normal request is answered
within 2 s and /health tells the truth."""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx2
import pytest

from lmforge.model.generate import SamplingParams
from lmforge.model.special import SpecialTokens
from lmforge.serve.config import ServeArgs
from lmforge.serve.openai import local_app
from tests.serve.conftest import live_server

KEY = "sk-abuse"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_body_bytes": 65536, "body_timeout_s": 1.0, "max_concurrent_requests": 8}
NORMAL = {"model": "tiny", "prompt": "hello world", "max_tokens": 4, "temperature": 0}


def make_app(artifact, **limits):
    model = {"name": "tiny", "artifact": artifact, "max_batch_size": 4, "max_waiting": 8}
    args = ServeArgs(
        models=[model], limits={**LIMITS, **limits}, api_key_env="LMFORGE_TEST_ABUSE_KEYS"
    )
    return local_app(args)


@pytest.fixture(scope="module")
def served(artifact):
    os.environ["LMFORGE_TEST_ABUSE_KEYS"] = KEY
    try:
        app = make_app(artifact)
        with live_server(app) as url:
            yield app, url
    finally:
        os.environ.pop("LMFORGE_TEST_ABUSE_KEYS")


def assert_serving(url: str, health: int = 200) -> None:
    """A normal request answers within 2 s, and /health says what it should."""
    with httpx2.Client(base_url=url, headers=AUTH, timeout=2) as http:
        done = http.post("/v1/completions", json=NORMAL)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
        assert http.get("/health").status_code == health


def raw(url: str, head: str, body: bytes = b"") -> socket.socket:
    """A connection that has sent `head` (request line and headers) and `body`, and no more."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def post_head(path: str, length: int | None, key: str = KEY) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {key}"]
    lines += ["Content-Type: application/json"]
    lines += [f"Content-Length: {length}"] if length is not None else ["Transfer-Encoding: chunked"]
    return "\n".join(lines) + "\n"


def status_of(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the bytes of the response on `sock` (read until the server closes it)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        sock.close()
    return int(data.split(b" ", 2)[1]), data


# ---------------------------------------------------------------- seeds and failed requests


def test_a_seed_out_of_range_is_400_and_the_server_keeps_serving(served):
    app, url = served
    engine = app.state.backends["tiny"].engine
    with httpx2.Client(base_url=url, headers=AUTH, timeout=5) as http:
        for seed in (2**64, 2**63, -1):
            response = http.post("/v1/completions", json={**NORMAL, "seed": seed})
            assert response.status_code == 400, seed
            assert response.json()["error"]["param"] == "seed"
        # The top of the range, with n=2: choice 1's seed wraps around instead of overflowing.
        top = {**NORMAL, "seed": 2**63 - 1, "n": 2, "temperature": 1.0}
        response = http.post("/v1/completions", json=top)
        assert response.status_code == 200 and len(response.json()["choices"]) == 2
    assert_serving(url)
    assert sorted(engine.free) == [0, 1, 2, 3] and engine.healthy()


def test_a_request_failing_in_the_engine_fails_alone(served, monkeypatch):
    """A request whose generation raises (here: its sampler) is a 500 for that request only;
    requests beside it finish, and its slot comes back."""
    from lmforge.serve import engine as engine_module

    app, url = served
    engine = app.state.backends["tiny"].engine
    sample = engine_module.sample_tokens

    def fragile(logits, params, gens):
        if any(p.top_p == 0.25 for p in params):
            raise RuntimeError("sampling exploded")
        return sample(logits, params, gens)

    monkeypatch.setattr(engine_module, "sample_tokens", fragile)
    bad = {**NORMAL, "top_p": 0.25, "temperature": 1.0}
    longer = {**NORMAL, "max_tokens": 24}
    results = {}

    def post(name, body):
        with httpx2.Client(base_url=url, headers=AUTH, timeout=10) as http:
            results[name] = http.post("/v1/completions", json=body)

    threads = [
        threading.Thread(target=post, args=(name, body))
        for name, body in (("a", longer), ("bad", bad), ("b", longer))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["bad"].status_code == 500
    assert "generation failed in sampling" in results["bad"].json()["error"]["message"]
    for name in ("a", "b"):
        assert results[name].status_code == 200
        assert results[name].json()["usage"]["completion_tokens"] == 24
    assert_serving(url)
    assert sorted(engine.free) == [0, 1, 2, 3] and engine.healthy()


def test_a_broken_engine_says_so_on_health_and_in_check_health(artifact, monkeypatch):
    """A failed batched step: /health 503 (so probes and Serve replace the replica), and new
    requests get 503 with Retry-After instead of waiting for their timeout."""
    from lmforge.model.kvcache import DecodeRunner
    from lmforge.serve import engine as engine_module
    from lmforge.serve.app import ModelServer

    def broken(self, tokens, positions):  # the batched decode step
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setenv("LMFORGE_TEST_ABUSE_KEYS", KEY)
    app = make_app(artifact)
    monkeypatch.setattr(DecodeRunner, "__call__", broken)
    with live_server(app) as url, httpx2.Client(base_url=url, headers=AUTH, timeout=5) as http:
        assert http.get("/health").status_code == 200
        failed = http.post("/v1/completions", json=NORMAL)
        assert failed.status_code == 500 and "illegal memory" in failed.json()["error"]["message"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json() == {
            "status": "unhealthy",
            "models": {"tiny": False},
        }
        refused = http.post("/v1/completions", json=NORMAL)
        assert refused.status_code == 503 and "engine is down" in refused.text
        assert refused.headers["retry-after"] == "1"
    # The Serve replica's health check raises, so Ray replaces the replica.
    server = ModelServer({"name": "tiny", "artifact": artifact, "max_batch_size": 2})
    try:
        server.check_health()
        server.engine.submit(
            engine_module.Request([1, 2], SamplingParams(max_tokens=4), lambda o: None)
        )
        deadline = time.monotonic() + 10
        while server.engine.last_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(RuntimeError, match="engine of tiny is down: RuntimeError: CUDA"):
            server.check_health()
    finally:
        server.engine.shutdown(drain_s=1)


# ---------------------------------------------------------------- bodies


def test_a_declared_large_body_is_413_before_it_is_read_and_health_stays_up(served):
    _, url = served
    sock = raw(url, post_head("/v1/completions", 50_000_000), b'{"model": "tiny", "pro')
    with httpx2.Client(base_url=url, timeout=2) as http:  # meanwhile
        assert http.get("/health").json()["status"] == "ok"
    status, data = status_of(sock)
    assert status == 413 and b"body_too_large" in data and b"50000000 bytes" in data
    assert_serving(url)


def test_a_chunked_body_is_cut_at_the_limit(served):
    _, url = served

    def chunks():  # 16 x 8 KiB: the limit (64 KiB) is passed on the way
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(16):
            yield b"a" * 8192
        yield b'"}'

    with httpx2.Client(base_url=url, headers=AUTH, timeout=5) as http:
        response = http.post("/v1/completions", content=chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert "grew past the limit 65536 bytes" in response.json()["error"]["message"]
    assert_serving(url)


def test_a_long_prompt_is_refused_by_its_characters_before_encoding(served, monkeypatch):
    """Under the body limit but longer than 32 characters per token of context (128 tokens):
    400 with the numbers, and the tokenizer is never called."""
    _, url = served

    def never(*args, **kwargs):
        raise AssertionError("encoded a prompt that was refused by its length")

    monkeypatch.setattr(SpecialTokens, "encode_prompt", never)
    monkeypatch.setattr(SpecialTokens, "encode_chat", never)
    text = "a" * 5000
    with httpx2.Client(base_url=url, headers=AUTH, timeout=5) as http:
        for path, body, param in (
            ("/v1/completions", {**NORMAL, "prompt": ["short", text]}, "prompt"),
            (
                "/v1/chat/completions",
                {
                    "model": "tiny",
                    "messages": [
                        {"role": "system", "content": text[:2500]},
                        {"role": "user", "content": text[:2500] + "!"},
                    ],
                },
                "messages",
            ),
            ("/tokenize", {"prompt": text}, "prompt"),
        ):
            response = http.post(path, json=body)
            assert response.status_code == 400, path
            error = response.json()["error"]
            assert error["param"] == param and error["code"] == "context_length_exceeded"
            assert "has 5001 characters" in error["message"] or "has 5000" in error["message"]
            assert "the limit is 4096" in error["message"]
    monkeypatch.undo()
    assert_serving(url)


def test_encoding_runs_off_the_event_loop(served, monkeypatch):
    """While a prompt is being encoded, the server still answers /health."""
    _, url = served
    encoding, release = threading.Event(), threading.Event()
    real = SpecialTokens.encode_prompt

    def slow(self, tokenizer, text):
        if text == "slow to encode":
            encoding.set()
            assert release.wait(10)
        return real(self, tokenizer, text)

    monkeypatch.setattr(SpecialTokens, "encode_prompt", slow)
    result = {}

    def post():
        with httpx2.Client(base_url=url, headers=AUTH, timeout=15) as http:
            result["r"] = http.post("/tokenize", json={"prompt": "slow to encode"})

    thread = threading.Thread(target=post)
    thread.start()
    try:
        assert encoding.wait(5)
        with httpx2.Client(base_url=url, timeout=2) as http:
            assert http.get("/health").status_code == 200
    finally:
        release.set()
        thread.join()
    assert result["r"].status_code == 200 and result["r"].json()["count"] >= 3


# ---------------------------------------------------------------- slow uploads


def test_a_trickled_body_is_cut_with_408(served):
    _, url = served
    sock = raw(url, post_head("/v1/completions", 1000), b'{"model": "tiny", ')
    status, data = status_of(sock)  # nothing more is sent: cut after body_timeout_s (1 s)
    assert status == 408 and b"not received within 1 s (18 bytes came)" in data
    assert_serving(url)


def test_slow_uploads_do_not_stall_health_and_are_refused_past_the_limit(served):
    """Twice the concurrency limit of uploads that never finish: those past the limit get 429
    at once, before their body; /health answers meanwhile; all are cut by the body timeout,
    and then normal requests are served."""
    app, url = served
    socks = [raw(url, post_head("/v1/completions", 60_000), b"{") for _ in range(16)]
    try:
        deadline = time.monotonic() + 5
        while app.state.receiving < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.receiving == 8
        with httpx2.Client(base_url=url, headers=AUTH, timeout=2) as http:
            assert http.get("/health").status_code == 200
            refused = http.post("/v1/completions", json=NORMAL)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        statuses = sorted(status_of(s)[0] for s in socks)
    finally:
        for s in socks:
            s.close()
    assert statuses == [408] * 8 + [429] * 8
    assert app.state.receiving == 0 and app.state.inflight == 0
    assert_serving(url)


def test_one_keys_slow_uploads_hold_only_its_own_slots(artifact, monkeypatch):
    """A key trickling more uploads than its per-key cap holds only that many slots: the rest
    get 429 at once, before their body, naming the key's limit; the same key's normal request
    is refused too, while another key's normal request is served; nothing stays counted."""
    other = {"Authorization": "Bearer sk-other"}
    monkeypatch.setenv("LMFORGE_TEST_ABUSE_KEYS", f"{KEY},sk-other")
    app = make_app(artifact, body_timeout_s=3.0, key_max_concurrent_requests=4)
    with live_server(app) as url:
        socks = [raw(url, post_head("/v1/completions", 60_000), b"{") for _ in range(10)]
        try:
            deadline = time.monotonic() + 2
            while app.state.receiving < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert app.state.receiving == 4  # 8 replica slots, 4 for the key
            with httpx2.Client(base_url=url, timeout=2) as http:
                served = http.post("/v1/completions", json=NORMAL, headers=other)
                assert served.status_code == 200, served.text
                assert served.json()["usage"]["completion_tokens"] == 4
                refused = http.post("/v1/completions", json=NORMAL, headers=AUTH)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert "with this API key (limit 4" in refused.json()["error"]["message"]
            assert app.state.receiving == 4  # the uploads were still held meanwhile
            answers = [status_of(s) for s in socks]
        finally:
            for s in socks:
                s.close()
        assert sorted(status for status, _ in answers) == [408] * 4 + [429] * 6
        for status, data in answers:
            if status == 429:
                assert b"with this API key (limit 4" in data and b"retry-after: 1" in data.lower()
        assert app.state.receiving == 0 and app.state.inflight == 0
        assert app.state.quotas.inflight == {}
        assert_serving(url)
