"""The OpenAI-compatible API in-process: responses, streams, tokenizer routes, errors, auth."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2
import pytest
from fastapi.testclient import TestClient

from lmforge.model.generate import SamplingParams
from lmforge.model.special import LMFORGE
from lmforge.serve.config import ServeArgs
from lmforge.serve.engine import Output
from lmforge.serve.openai import create_app, local_app

KEY_ENV = "LMFORGE_TEST_SERVE_KEYS"


def make_args(artifact, keys_env=KEY_ENV, **limits):
    model = {"name": "tiny", "artifact": artifact, "max_batch_size": 4, "max_waiting": 4}
    return ServeArgs(models=[model], limits=limits, api_key_env=keys_env)


@pytest.fixture(scope="module")
def client(artifact):
    with TestClient(local_app(make_args(artifact, max_n=3, max_tokens=64))) as c:
        yield c


def events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_and_greedy_completion_in_every_prompt_form(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0][
        "max_model_len"
    ] == 128
    ids = client.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    base = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    by_text = client.post("/v1/completions", json={**base, "prompt": "hello world"}).json()
    by_ids = client.post("/v1/completions", json={**base, "prompt": ids}).json()
    many = client.post("/v1/completions", json={**base, "prompt": ["hello world", "def"]}).json()
    assert by_text["choices"][0]["text"] == by_ids["choices"][0]["text"]
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert (
        by_text["object"] == "text_completion"
        and by_text["choices"][0]["finish_reason"] == "length"
    )
    assert by_text["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 6,
        "total_tokens": len(ids) + 6,
    }


def test_stream_concatenates_to_the_non_stream_answer(client):
    body = {"model": "tiny", "prompt": "the quick", "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    response = client.post("/v1/completions", json={**body, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.text)
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_echo_with_zero_max_tokens_scores_the_prompt(client):
    ids = client.post("/tokenize", json={"prompt": "the quick brown fox"}).json()["tokens"]
    body = {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert all(x < 0 for x in lp["token_logprobs"][1:]) and lp["top_logprobs"][0] is None
    # The top-1 entry plus the chosen token: the max is the greedy token's logprob.
    assert all(
        max(t.values()) >= lp["token_logprobs"][i + 1] for i, t in enumerate(lp["top_logprobs"][1:])
    )
    assert choice["text"] == client.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])


def test_chat_non_stream_and_stream_agree(client):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    whole = client.post("/v1/chat/completions", json=body).json()
    assert whole["object"] == "chat.completion"
    message = whole["choices"][0]["message"]
    assert message["role"] == "assistant"
    rendered = client.post("/tokenize", json={"messages": body["messages"]}).json()
    assert whole["usage"]["prompt_tokens"] == rendered["count"]
    chunks = events(
        client.post(
            "/v1/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ).text
    )
    assert chunks[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    assert text == message["content"] and chunks[-2]["usage"] == whole["usage"]


def test_n_choices_with_a_seed_are_reproducible(client):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "n": 3, "seed": 11}
    first = client.post("/v1/completions", json=body).json()
    again = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert len(first["choices"]) == 3 and first["usage"]["completion_tokens"] == 24


def test_tokenizer_info_serves_lm_eval_remote_tokenizer(client):
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|eos|>" and info["model_max_length"] == 128
    ids = client.post("/tokenize", json={"prompt": "Paris is", "add_special_tokens": False}).json()
    assert client.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {
        "prompt": "Paris is"
    }


def _post(client, body: str | dict, path="/v1/completions", **headers):
    content = body if isinstance(body, str) else json.dumps(body)
    return client.post(
        path, content=content, headers={"content-type": "application/json", **headers}
    )


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ("{not json", 400, None, "not valid JSON"),
        ("[1, 2]", 400, None, "JSON object"),
        ({"prompt": "x"}, 400, "model", "model"),
        ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "integer"),
        ({"model": "tiny", "prompt": "x", "temperature": 9}, 400, "temperature", "less than"),
        ({"model": "tiny", "prompt": []}, 400, "prompt", "empty"),
        ({"model": "tiny", "prompt": [999999]}, 400, "prompt", "token ids"),
        ({"model": "nope", "prompt": "x"}, 404, "model", "does not exist"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 65}, 400, "max_tokens", "limit is 64"),
        ({"model": "tiny", "prompt": "x", "n": 4}, 400, "n", "limit is 3"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "echo"),
        (
            {"model": "tiny", "prompt": "x", "presence_penalty": 1},
            400,
            "presence_penalty",
            "not supported",
        ),
        (
            {"model": "tiny", "prompt": "a " * 100, "max_tokens": 60},
            400,
            "max_tokens",
            "maximum context length is 128",
        ),
    ],
)
def test_bad_requests_get_their_status_and_the_openai_envelope(client, body, status, param, words):
    response = _post(client, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]


def test_context_overflow_names_the_numbers(client):
    ids = client.post("/tokenize", json={"prompt": "a " * 100}).json()["tokens"]
    error = _post(client, {"model": "tiny", "prompt": ids, "max_tokens": 60}).json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert (
        f"{len(ids) + 60} were requested ({len(ids)} in the prompt, 60 for the completion)"
        in error["message"]
    )


def test_unknown_route_and_method_use_the_envelope(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = client.get("/v1/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_every_route_but_health_needs_the_key(artifact, monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, "env-key")
    key_file = tmp_path / "keys"
    key_file.write_text("file-key\n")
    args = make_args(artifact).model_copy(update={"api_key_file": str(key_file)})
    app = local_app(args)
    open_routes = []
    with TestClient(app) as c:
        for route in app.routes:
            for method in sorted(getattr(route, "methods", None) or {"GET"}):
                if method == "HEAD":
                    continue
                response = c.request(method, route.path, json={})
                if response.status_code != 401:
                    open_routes.append(route.path)
                else:
                    assert response.json()["error"]["code"] == "invalid_api_key"
                    assert response.headers["www-authenticate"] == "Bearer"
        assert open_routes == ["/health", "/playground"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        for key in ("env-key", "file-key"):
            assert (
                c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            )
        assert c.get("/health").json()["status"] == "ok"


class ScriptedBackend:
    """A fake model: one token every `delay` seconds, optionally failing after `fail_after`."""

    max_seq_len = 128
    special = LMFORGE

    def __init__(self, tokenizer, delay: float, fail_after: int | None = None):
        self.name, self.tokenizer, self.delay, self.fail_after = (
            "tiny",
            tokenizer,
            delay,
            fail_after,
        )

    async def generate(self, prompt: list[int], params: SamplingParams):
        for i in range(params.max_tokens):
            await asyncio.sleep(self.delay)
            if i == self.fail_after:
                yield Output([], "", finish_reason="error", error="generation failed: boom")
                return
            last = i == params.max_tokens - 1
            yield Output(
                [65], "a", None, None, "length" if last else None, None, len(prompt), i + 1, 1
            )

    async def healthy(self) -> bool:
        return True


def scripted_app(artifact, backend_kw, **limits):
    from tokenizers import Tokenizer

    backend = ScriptedBackend(Tokenizer.from_file(f"{artifact}/tokenizer.json"), **backend_kw)
    return create_app(
        {"tiny": backend}, make_args(artifact, keys_env="LMFORGE_UNSET_ENV", **limits)
    )


async def _request(app, bodies_and_delays):
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:

        async def one(body, delay):
            await asyncio.sleep(delay)
            return await http.post("/v1/completions", json=body)

        return await asyncio.gather(*(one(b, d) for b, d in bodies_and_delays))


def test_timeout_is_504_and_mid_stream_failure_is_an_error_event(artifact):
    slow = scripted_app(artifact, {"delay": 0.2}, request_timeout_s=0.3)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 5}
    (response,) = asyncio.run(_request(slow, [(body, 0)]))
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
    failing = scripted_app(artifact, {"delay": 0.01, "fail_after": 2})
    (response,) = asyncio.run(_request(failing, [({**body, "stream": True}, 0)]))
    chunks = events(response.text)
    assert response.status_code == 200 and [c["choices"][0]["text"] for c in chunks[:2]] == [
        "a",
        "a",
    ]
    assert chunks[2]["error"]["type"] == "server_error" and chunks[3] == "[DONE]"


def test_over_the_concurrency_limit_is_429_with_retry_after(artifact):
    app = scripted_app(artifact, {"delay": 0.05}, max_concurrent_requests=1, retry_after_s=3)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 6}
    first, second, later = asyncio.run(_request(app, [(body, 0), (body, 0.1), (body, 0.6)]))
    assert first.status_code == 200 and later.status_code == 200
    assert second.status_code == 429 and second.headers["retry-after"] == "3"
    assert second.json()["error"]["type"] == "rate_limit_error"


def test_a_full_engine_queue_is_503_with_retry_after(artifact):
    args = make_args(artifact, keys_env="LMFORGE_UNSET_ENV")
    args.models[0].max_batch_size, args.models[0].max_waiting = 1, 0
    app = local_app(args)
    engine = app.state.backends["tiny"].engine
    step = engine.step

    def slow_step():  # 20 steps/s, so the first request surely holds the only slot
        time.sleep(0.05)
        return step()

    engine.step = slow_step
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}
    first, second = asyncio.run(_request(app, [(body, 0), (body, 0.1)]))
    assert first.status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["code"] == "overloaded"


def test_metrics_count_requests_tokens_and_latency(client):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
    client.post("/v1/completions", json=body)
    _post(client, {"model": "nope", "prompt": "x"})
    text = client.get("/metrics").text
    assert 'lmforge_requests_total{route="/v1/completions",status="404"}' in text
    for name in (
        "lmforge_request_latency_seconds_bucket",
        "lmforge_time_to_first_token_seconds_count",
        "lmforge_generation_tokens_total",
        "lmforge_prompt_tokens_total",
        "lmforge_requests_running",
        "lmforge_requests_waiting",
        "lmforge_batch_size_bucket",
    ):
        assert name in text
    assert 'lmforge_requests_running{model="tiny"} 0.0' in text
