"""Authentication and tenancy: an API that cannot open by accident, keys as bytes, text the
tokenizer cannot take, honest request metrics, per-request and per-key limits, fair batching,
and feedback tied to the key that sent it."""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest
from fastapi.testclient import TestClient

from lmforge import ConfigError
from lmforge.model.generate import SamplingParams
from lmforge.serve.config import ServeArgs, key_id
from lmforge.serve.engine import Request
from lmforge.serve.logreader import read_log
from lmforge.serve.metrics import MetricsMiddleware, ServeMetrics
from lmforge.serve.openai import local_app
from tests.serve.conftest import live_server

MODEL = {"name": "tiny", "artifact": "x"}


def args_with(**kw) -> ServeArgs:
    return ServeArgs(models=[MODEL], **{"api_key_env": "LMFORGE_UNSET_ENV", **kw})


# ---------------------------------------------------------------- auth fails closed


def test_an_empty_key_file_or_key_env_refuses_to_start(tmp_path, monkeypatch):
    empty = tmp_path / "keys"
    empty.write_text("  \n\t\n")
    with pytest.raises(ConfigError, match=r"api_key_file .*keys holds no API key"):
        args_with(api_key_file=str(empty)).check_auth()
    monkeypatch.setenv("LMFORGE_TEST_EMPTY_KEYS", " , ")
    with pytest.raises(ConfigError, match="LMFORGE_TEST_EMPTY_KEYS .* holds no API key"):
        args_with(api_key_env="LMFORGE_TEST_EMPTY_KEYS").check_auth()
    assert args_with().check_auth() == {}  # no source configured, loopback: open, as before


def test_keyless_serving_is_refused_off_the_loopback_unless_insecure_no_auth():
    for host in ("0.0.0.0", "10.1.2.3", "::", "my-host"):
        with pytest.raises(ConfigError, match=f"refusing to serve {host} with no API keys"):
            args_with(host=host).check_auth()
        assert args_with(host=host, insecure_no_auth=True).check_auth() == {}
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert args_with(host=host).check_auth() == {}


def test_a_serve_config_file_is_taken_as_exposed(monkeypatch):
    """`serve deploy` builds from the file's args: the proxy's host is not in them."""
    from lmforge.serve.app import build_app

    with pytest.raises(ConfigError, match="refusing to serve 0.0.0.0"):
        build_app({"models": [MODEL], "api_key_env": "LMFORGE_UNSET_ENV"})


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--host", "0.0.0.0"], "refusing to serve 0.0.0.0 with no API keys"),
        (["--api-key-file", "EMPTY"], "holds no API key"),
    ],
)
def test_serve_refuses_with_one_line_and_exit_2(cli, artifact, tmp_path, argv, words):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    code, out, err = cli("serve", "--model", artifact, "--no-ray", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and words in err


def test_the_shipped_serve_config_needs_keys_from_its_env(monkeypatch):
    from lmforge.serve.app import build_app
    from lmforge.serve.command import load_serve_args

    monkeypatch.delenv("LMFORGE_API_KEYS", raising=False)
    data = load_serve_args("jobs/serve_config.yaml", [], None).model_dump()
    with pytest.raises(ConfigError, match="refusing to serve"):
        build_app(data)


# ---------------------------------------------------------------- keys, text, metrics (live)


@pytest.fixture(scope="module")
def live(artifact, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("ops:sk-ops\nsk-other\n")
    log = str(tmp_path_factory.mktemp("log"))
    model = {"name": "tiny", "artifact": artifact, "max_batch_size": 4}
    args = ServeArgs(
        models=[model],
        api_key_env="LMFORGE_UNSET_ENV",
        api_key_file=str(keys),
        trusted_keys=["ops"],
        limits={"max_sequences": 6, "max_stop": 2, "max_stop_chars": 8},
        request_log={"path": log, "flush_seconds": 3600},
        drift={"sample_rate": 0},
    )
    app = local_app(args)
    with live_server(app) as url:
        yield url, app, log


def auth(key: str = "sk-ops") -> dict:
    return {"Authorization": f"Bearer {key}"}


def post_raw(url: str, path: str, raw: str, headers=None) -> httpx2.Response:
    """A JSON body sent as written: json.dumps escapes a lone surrogate as \\ud800, as an
    attacker's client would."""
    headers = {"Content-Type": "application/json", **(headers or auth())}
    return httpx2.post(url + path, content=raw.encode(), headers=headers, timeout=30)


def test_a_non_ascii_bearer_token_is_401_not_500(live):
    url, _, _ = live
    for token in ("sk-é", "ключ", "\u2603"):
        r = httpx2.get(url + "/v1/models", headers={"Authorization": b"Bearer " + token.encode()})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(url + "/v1/models", headers=auth("sk-other")).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "tiny", "prompt": "a\ud800b"}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["ok", "\udfff"]}, "prompt"),
        ("/v1/completions", {"model": "tiny\ud800", "prompt": "hi"}, "model"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": ["\ud800"]}, "stop"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages"),
        ("/tokenize", {"prompt": "\ud800"}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x\udbff"}]}, "messages"),
        ("/v1/feedback", {"completion_id": "c", "rating": 1, "tags": ["\ud800"]}, "tags"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(live, path, body, param):
    url, _, _ = live
    r = post_raw(url, path, json.dumps(body))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "lone UTF-16 surrogate" in error["message"]
    # A valid pair is a character, and fine.
    ok = post_raw(url, "/tokenize", json.dumps({"prompt": "smile \ud83d\ude00"}))
    assert ok.status_code == 200


def metric(url: str, route: str, status: int) -> float:
    text = httpx2.get(url + "/metrics", headers=auth()).text
    line = f'lmforge_requests_total{{route="{route}",status="{status}"}} '
    found = [ln for ln in text.splitlines() if ln.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_401s_are_counted_and_a_client_that_leaves_is_499_not_500(live):
    url, _, _ = live
    before = metric(url, "/v1/models", 401)
    for _ in range(3):
        assert httpx2.get(url + "/v1/models").status_code == 401
    assert metric(url, "/v1/models", 401) == before + 3
    left, errors = metric(url, "/v1/completions", 499), metric(url, "/v1/completions", 500)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100, "stream": True}
    with httpx2.stream("POST", url + "/v1/completions", json=body, headers=auth()) as r:
        next(r.iter_lines())  # the first event, then hang up
    for _ in range(100):  # the server notices at its next write
        if metric(url, "/v1/completions", 499) == left + 1:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert metric(url, "/v1/completions", 499) == left + 1
    assert metric(url, "/v1/completions", 500) == errors


def test_a_cancelled_request_counts_as_499():
    """Serve cancels the handler of a request whose client left: no response ever started."""
    metrics = ServeMetrics()

    async def app(scope, receive, send):
        await asyncio.sleep(10)

    async def run():
        middleware = MetricsMiddleware(app, metrics, {"/v1/completions"})
        scope = {"type": "http", "path": "/v1/completions"}
        task = asyncio.create_task(middleware(scope, None, None))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert metrics.requests.labels("/v1/completions", "499").local._value.get() == 1
    assert metrics.requests.labels("/v1/completions", "500").local._value.get() == 0


def test_websocket_handshakes_need_the_key(tmp_path):
    """Refused by the auth middleware (1008, policy violation), not passed to the app (which
    would close it as an unknown route, 1000)."""
    from starlette.websockets import WebSocketDisconnect

    from lmforge.serve.openai import create_app

    keys = tmp_path / "keys"
    keys.write_text("sk-ops\n")
    codes = []
    with TestClient(create_app({}, args_with(api_key_file=str(keys)))) as client:
        for headers in ({}, auth("wrong"), auth()):
            with (
                pytest.raises(WebSocketDisconnect) as closed,
                client.websocket_connect("/v1/completions", headers=headers),
            ):
                pass
            codes.append(closed.value.code)
    assert codes == [1008, 1008, 1000]


# ---------------------------------------------------------------- limits per request


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": ["a", "b", "c"], "n": 3}, "n", "3 prompts x n=3 = 9 sequences; the limit per request is 6"),
        ({"prompt": "a", "stop": ["x", "y", "z"]}, "stop", "3 stop strings; the limit is 2"),
        ({"prompt": "a", "stop": "x" * 9}, "stop", "a stop string has 9 characters; the limit is 8"),
        ({"prompt": "a", "logit_bias": {"50": 100}}, "logit_bias", "logit_bias is not supported"),
    ],
)  # fmt: skip
def test_per_request_limits_are_400s_with_the_numbers(live, body, param, words):
    url, _, _ = live
    r = httpx2.post(url + "/v1/completions", json={"model": "tiny", **body}, headers=auth())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


def test_an_empty_logit_bias_is_accepted(live):
    url, _, _ = live
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2, "logit_bias": {}}
    assert httpx2.post(url + "/v1/completions", json=body, headers=auth()).status_code == 200


# ---------------------------------------------------------------- per-key quotas


def quota_app(artifact, **limits):
    model = {"name": "tiny", "artifact": artifact, "max_batch_size": 4}
    args = ServeArgs(
        models=[model],
        api_key_env="LMFORGE_TEST_QUOTA_KEYS",
        limits=limits,
        drift={"sample_rate": 0},
    )
    return local_app(args)


async def requests_at(app, calls):
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://t", timeout=60) as http:

        async def one(key, body, delay):
            await asyncio.sleep(delay)
            return await http.post("/v1/completions", json=body, headers=auth(key))

        return await asyncio.gather(*(one(*c) for c in calls))


def test_per_key_concurrency_is_429_for_that_key_only(artifact, monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_QUOTA_KEYS", "sk-a,sk-b")
    app = quota_app(artifact, key_max_concurrent_requests=1, retry_after_s=2)
    engine = app.state.backends["tiny"].engine
    step = engine.step

    def slow_step():  # so the first request surely still runs when the others come
        import time

        time.sleep(0.02)
        return step()

    engine.step = slow_step
    long = {"model": "tiny", "prompt": "hello", "max_tokens": 30}
    short = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    first, same_key, other_key = asyncio.run(
        requests_at(app, [("sk-a", long, 0), ("sk-a", short, 0.15), ("sk-b", short, 0.15)])
    )
    assert first.status_code == 200 and other_key.status_code == 200
    assert same_key.status_code == 429 and same_key.headers["retry-after"] == "2"
    assert "concurrent requests with this API key (limit 1)" in same_key.json()["error"]["message"]


def test_the_token_quota_is_429_with_the_retry_after_that_frees_enough(artifact, monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_QUOTA_KEYS", "sk-a,sk-b")
    app = quota_app(artifact, key_tokens_per_minute=120)
    now = [1000.0]  # the buckets' clock: no refill between requests, however slow they run
    # A fixed per-request seed: unseeded sampling draws from the process's RNG, whose state
    # depends on the tests run before, and an early end-of-text refunds most of the reservation.
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 50, "seed": 0}
    with TestClient(app) as client:
        app.state.quotas.clock = lambda: now[0]
        ok = client.post("/v1/completions", json=body, headers=auth("sk-a"))
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["finish_reason"] == "length"  # the premise: 50 tokens used
        used = ok.json()["usage"]["total_tokens"]
        # Unused max_tokens came back: the next fits only if used + reserved <= 120.
        second = client.post("/v1/completions", json=body, headers=auth("sk-a"))
        reserve = ok.json()["usage"]["prompt_tokens"] + 50
        assert (second.status_code == 200) == (used + reserve <= 120)
        third = client.post("/v1/completions", json=body, headers=auth("sk-a"))
        assert third.status_code == 429, third.text
        retry = int(third.headers["retry-after"])
        assert 1 <= retry <= 60  # 2 tokens a second refill
        assert "token quota of this API key (120 per minute)" in third.json()["error"]["message"]
        now[0] += retry  # the Retry-After it gave is enough
        assert client.post("/v1/completions", json=body, headers=auth("sk-a")).status_code == 200
        assert client.post("/v1/completions", json=body, headers=auth("sk-b")).status_code == 200
        huge = {**body, "max_tokens": 100, "n": 2}
        too_big = client.post("/v1/completions", json=huge, headers=auth("sk-b"))
        assert too_big.status_code == 400 and "120 tokens per minute" in too_big.text


def test_the_engine_admits_the_tenant_with_fewest_running_first(artifact):
    """A fan-out of one key cannot queue ahead of another key's short request: when a slot
    frees, the key with nothing running gets it."""
    from lmforge.serve.engine import load_engine

    engine = load_engine(
        ServeArgs(models=[{"name": "t", "artifact": artifact, "max_batch_size": 2}]).models[0]
    )
    done: dict[str, int] = {}

    def submit(tenant: str, max_tokens: int) -> Request:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, tenant=tenant)
        name = f"{tenant}{len([k for k in done if k.startswith(tenant)])}"
        done[name] = -1

        def on_output(out, name=name):
            if out.finish_reason is not None:
                done[name] = engine.steps

        return engine.submit(Request([5, 6, 7], params, on_output))

    fan_out = [submit("a", 10) for _ in range(8)]
    engine.step()
    short = submit("b", 2)
    while any(v < 0 for v in done.values()):
        engine.step()
    # b waited for one of a's two running sequences, not for a's six queued ones.
    assert short.started_step <= fan_out[0].started_step + 11
    assert sum(r.started_step < short.started_step for r in fan_out) <= 3


# ---------------------------------------------------------------- feedback and keys


def test_feedback_carries_the_key_id_and_whether_it_is_trusted(live):
    url, app, log = live
    answer = httpx2.post(
        url + "/v1/completions",
        json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
        headers=auth("sk-other"),
    ).json()
    ids = []
    for key in ("sk-ops", "sk-other"):
        body = {"completion_id": answer["id"], "rating": 1}
        r = httpx2.post(url + "/v1/feedback", json=body, headers=auth(key))
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    app.state.request_log.flush()
    rows = {r["feedback_id"]: r for r in read_log(log, "feedback").to_pylist()}
    ops, other = rows[ids[0]], rows[ids[1]]
    assert (ops["key_id"], ops["trusted"]) == ("ops", True)
    assert (other["key_id"], other["trusted"]) == (key_id("sk-other"), False)
    assert "sk-other" not in json.dumps(rows, default=str)


def test_who_is_trusted_by_default():
    one = args_with()
    assert one.trusted_key_ids({"sk-1": "k1"}) == {"k1"}  # a single user's one key
    assert one.trusted_key_ids({"sk-1": "k1", "sk-2": "k2"}) == set()  # several: say which
    assert one.trusted_key_ids({}) == {"anonymous"}  # the open API on the loopback
    assert args_with(host="0.0.0.0", insecure_no_auth=True).trusted_key_ids({}) == set()
    assert args_with(trusted_keys=["k2"]).trusted_key_ids({"sk-1": "k1", "sk-2": "k2"}) == {"k2"}


def test_a_short_request_is_not_starved_by_another_keys_fan_out(artifact, monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_QUOTA_KEYS", "sk-a,sk-b")
    app = quota_app(artifact)
    engine = app.state.backends["tiny"].engine
    engine.max_batch_size = 2
    engine.free = engine.free[:2]
    step, finished = engine.step, {}

    def slow_step():  # 100 steps/s: the order of events does not depend on the machine's speed
        import time

        time.sleep(0.01)
        return step()

    engine.step = slow_step

    async def run():
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://t", timeout=60) as h:

            async def post(name, key, body, delay):
                await asyncio.sleep(delay)
                r = await h.post("/v1/completions", json=body, headers=auth(key))
                finished[name] = engine.steps
                return r

            fan_out = {"model": "tiny", "prompt": "the quick", "n": 6, "max_tokens": 40}
            short = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
            return await asyncio.gather(
                post("fan_out", "sk-a", fan_out, 0), post("short", "sk-b", short, 0.1)
            )

    big, small = asyncio.run(run())
    assert big.status_code == small.status_code == 200
    generated = big.json()["usage"]["completion_tokens"]
    assert generated > 3 * 12  # the six sequences ran long enough to matter
    # The short one waited for one of the two running sequences, not for the four queued.
    assert finished["short"] < finished["fan_out"] / 2, finished


def test_the_playground_runs_only_its_own_script_and_style(live):
    """The page still works under this policy: tests/serve/test_playground.py drives it in
    Chromium."""
    url, _, _ = live
    r = httpx2.get(url + "/playground")
    policy = dict(p.strip().split(" ", 1) for p in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    for directive in ("script-src", "style-src"):
        assert policy[directive].startswith("'sha256-") and "unsafe" not in policy[directive]
    assert 'style="' not in r.text  # inline style attributes would be blocked
