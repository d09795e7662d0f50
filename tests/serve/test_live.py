"""Against a live HTTP server (uvicorn, no Ray): the official openai client, client disconnects."""

from __future__ import annotations

import time

import httpx2
import openai
import pytest

from lmforge.serve.config import ServeArgs
from lmforge.serve.openai import local_app
from tests.serve.conftest import live_server


@pytest.fixture(scope="module")
def served(artifact):
    import os

    os.environ["LMFORGE_TEST_LIVE_KEYS"] = "sk-live"
    model = {"name": "tiny", "artifact": artifact, "max_batch_size": 1, "max_waiting": 0}
    app = local_app(ServeArgs(models=[model], api_key_env="LMFORGE_TEST_LIVE_KEYS"))
    with live_server(app) as url:
        yield app, url
    os.environ.pop("LMFORGE_TEST_LIVE_KEYS")


def check_openai_client(base_url: str, api_key: str, model: str = "tiny") -> None:
    """Completions and chat, plain and streamed, through the official client (greedy: equal)."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    assert [m.id for m in client.models.list().data] == [model]
    done = client.completions.create(model=model, prompt="hello world", max_tokens=8, temperature=0)
    assert done.usage.completion_tokens == 8 or done.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model=model, prompt="hello world", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == done.choices[0].text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == answer.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=1)


def test_official_openai_client(served):
    _, url = served
    check_openai_client(f"{url}/v1", "sk-live")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_closing_a_stream_frees_its_slot_at_once(served):
    app, url = served
    engine = app.state.backends["tiny"].engine
    step = engine.step

    def slow_step():  # about 50 tokens/s, so the stream is surely still running when closed
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    headers = {"Authorization": "Bearer sk-live"}
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 120, "stream": True, "temperature": 0}
    with httpx2.Client(base_url=url, headers=headers, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # generating now, holding the only slot
            assert engine.num_running == 1
        deadline = time.monotonic() + 5
        while engine.num_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 0 and engine.free == [0]
        assert app.state.inflight == 0  # the API's concurrency slot is back too
        # The only slot is free again: a new request is served, not refused with 503.
        quick = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        assert http.post("/v1/completions", json=quick).status_code == 200
        engine.step = step
        metrics = http.get("/metrics").text
        assert 'lmforge_requests_running{model="tiny"} 0.0' in metrics
