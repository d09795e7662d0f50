"""The API's monitoring side in-process: request log rows, /v1/feedback, model version in
responses, and the quality metrics."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from lmforge.model.artifact import read_version
from lmforge.serve.config import ServeArgs
from lmforge.serve.logreader import read_log
from lmforge.serve.openai import local_app

KEY_ENV = "LMFORGE_TEST_FEEDBACK_KEYS"
AUTH = {"Authorization": "Bearer sk-fb"}


@pytest.fixture(scope="module")
def served(artifact, tmp_path_factory):
    """The app with a request log (every request, flushed only at shutdown) and a key."""
    import os

    os.environ[KEY_ENV] = "sk-fb"
    log_dir = str(tmp_path_factory.mktemp("requestlog"))
    model = {"name": "tiny", "artifact": artifact, "max_batch_size": 4, "val_bpb": 2.0}
    args = ServeArgs(
        models=[model],
        api_key_env=KEY_ENV,
        request_log={"path": log_dir, "flush_seconds": 3600},
        drift={"sample_rate": 0},
    )
    app = local_app(args)
    with TestClient(app, headers=AUTH) as client:
        yield client, app, log_dir
    os.environ.pop(KEY_ENV)


def test_responses_carry_the_model_version(served, artifact):
    client, _, _ = served
    version = read_version(artifact)["version"]
    assert version.startswith("v-")
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0}
    done = client.post("/v1/completions", json=body)
    assert done.headers["x-lmforge-model-version"] == version
    assert done.json()["system_fingerprint"] == version
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert chat.headers["x-lmforge-model-version"] == version
    assert chat.json()["system_fingerprint"] == version
    stream = client.post("/v1/completions", json={**body, "stream": True})
    assert stream.headers["x-lmforge-model-version"] == version
    chunks = [json.loads(x[6:]) for x in stream.text.splitlines() if x.startswith("data: {")]
    assert chunks and all(c["system_fingerprint"] == version for c in chunks)
    assert client.get("/v1/models").json()["data"][0]["version"] == version
    metrics = client.get("/metrics").text
    assert f'lmforge_model_info{{model="tiny",model_version="{version}"}} 1.0' in metrics
    assert 'lmforge_validation_bits_per_byte{model="tiny"} 2.0' in metrics


def test_feedback_is_stored_with_the_model_that_answered_and_counted(served, artifact):
    client, app, log_dir = served
    version = read_version(artifact)["version"]
    messages = [{"role": "user", "content": "my mail is ann@example.com, what is 2+2?"}]
    answer = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 4}
    ).json()
    rid = answer["id"]
    up = client.post("/v1/feedback", json={"completion_id": rid, "rating": 1, "tags": ["good"]})
    assert up.status_code == 200, up.text
    assert up.json()["object"] == "feedback" and up.json()["id"].startswith("fb-")
    assert up.json()["model"] == "tiny" and up.json()["model_version"] == version
    down = client.post(
        "/v1/feedback",
        json={"completion_id": rid, "rating": -1, "correction": "4; write to ann@example.com"},
    )
    unknown = client.post("/v1/feedback", json={"completion_id": "cmpl-gone", "rating": 0})
    assert down.status_code == unknown.status_code == 200
    assert unknown.json()["model"] is None
    metrics = client.get("/metrics").text
    for rating in ("positive", "negative"):
        line = f'lmforge_feedback_total{{model="tiny",model_version="{version}",rating="{rating}"}}'
        assert f"{line} 1.0" in metrics
    assert (
        'lmforge_feedback_total{model="unknown",model_version="unknown",rating="neutral"} 1.0'
        in metrics
    )
    app.state.request_log.flush()
    rows = {r["feedback_id"]: r for r in read_log(log_dir, "feedback").to_pylist()}
    first, second, third = (rows[r.json()["id"]] for r in (up, down, unknown))
    assert (first["completion_id"], first["rating"], first["tags"]) == (rid, 1.0, ["good"])
    assert (first["model"], first["model_version"]) == ("tiny", version)
    assert second["correction"] == "4; write to <EMAIL>" and second["rating"] == -1.0
    assert third["model"] is None and third["model_version"] is None
    (request,) = [r for r in read_log(log_dir, "requests").to_pylist() if r["completion_id"] == rid]
    assert request["endpoint"] == "chat" and request["model_version"] == version
    assert json.loads(request["messages_json"]) == [
        {"role": "user", "content": "my mail is <EMAIL>, what is 2+2?"}
    ]
    assert "<EMAIL>" in request["prompt"] and "ann@" not in request["prompt"]
    assert request["completion"] == answer["choices"][0]["message"]["content"]
    assert request["completion_tokens"] == answer["usage"]["completion_tokens"]
    assert request["status"] == 200 and request["latency_s"] > 0


def test_every_request_is_logged_streamed_or_not(served):
    client, app, log_dir = served
    body = {"model": "tiny", "prompt": "the quick", "max_tokens": 5, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()
    streamed = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [json.loads(x[6:]) for x in streamed.text.splitlines() if x.startswith("data: {")]
    app.state.request_log.flush()
    rows = {r["completion_id"]: r for r in read_log(log_dir, "requests").to_pylist()}
    a, b = rows[plain["id"]], rows[chunks[0]["id"]]
    for row in (a, b):
        assert row["endpoint"] == "completions" and row["prompt"] == "the quick"
        assert row["messages_json"] is None and row["finish_reason"] == "length"
        assert row["completion"] == plain["choices"][0]["text"]
        assert row["status"] == 200 and row["model"] == "tiny"
    assert a["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert a["completion_tokens"] == b["completion_tokens"] == 5
    metrics = client.get("/metrics").text
    assert 'lmforge_completion_length_tokens_bucket{le="8.0",model="tiny"}' in metrics


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"rating": 1}, "completion_id: Field required"),
        ({"completion_id": "x", "rating": 2}, "rating: Input should be less than or equal to 1"),
        ({"completion_id": "x", "rating": "up"}, "rating: Value error, must be a number"),
        ({"completion_id": "x", "rating": True}, "rating: Value error, must be a number"),
        ({"completion_id": "x", "rating": 1, "tags": "a"}, "tags: Input should be a valid list"),
        ({"completion_id": "x", "rating": 1, "stars": 5}, "stars: Extra inputs are not permitted"),
        ({"completion_id": "", "rating": 1}, "completion_id: String should have at least 1"),
    ],
)
def test_bad_feedback_is_a_400_naming_the_field(served, body, fragment):
    client, _, _ = served
    response = client.post("/v1/feedback", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith(fragment) and "\n" not in error["message"]
    assert client.post("/v1/feedback", content=b"{not json").status_code == 400


def test_feedback_needs_the_api_key(served):
    client, _, _ = served
    body = {"completion_id": "x", "rating": 1}
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        response = client.post("/v1/feedback", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/v1/feedback", json=body).status_code == 200


def test_without_a_log_path_feedback_is_counted_not_stored(artifact):
    model = {"name": "tiny", "artifact": artifact}
    app = local_app(ServeArgs(models=[model], api_key_env="LMFORGE_UNSET_ENV"))
    with TestClient(app) as client:
        response = client.post("/v1/feedback", json={"completion_id": "x", "rating": -0.5})
        assert response.status_code == 200 and response.json()["stored"] is False
        assert 'rating="negative"} 1.0' in client.get("/metrics").text
