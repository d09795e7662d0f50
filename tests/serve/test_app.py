"""The Serve application: config validation, deployment options, and a live local Serve app."""

from __future__ import annotations

import pytest

from lmforge import ConfigError
from lmforge.config import load_config
from lmforge.serve.config import ServeArgs
from tests.conftest import REPO, free_port
from tests.serve.test_live import check_openai_client


def test_shipped_serve_config_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "jobs" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` and the RayService accept
    (application,) = config["applications"]
    assert application["import_path"] == "lmforge.serve.app:build_app"
    args = ServeArgs.model_validate(application["args"])
    assert args.models[0].autoscaling.max_replicas >= args.models[0].autoscaling.min_replicas


def test_serve_args_refuse_mistakes_naming_them(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("models:\n  - {name: a, artifact: x, max_batch_sise: 4}\n")
    with pytest.raises(ConfigError, match="max_batch_sise"):
        load_config(ServeArgs, str(bad))
    bad.write_text("models:\n  - {name: a, artifact: x}\n  - {name: a, artifact: y}\n")
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(ServeArgs, str(bad))
    bad.write_text(
        "models:\n  - {name: a, artifact: x, autoscaling: {min_replicas: 3, max_replicas: 2}}\n"
    )
    with pytest.raises(ConfigError, match="above max_replicas"):
        load_config(ServeArgs, str(bad))


def test_deployment_options_come_from_the_config():
    from lmforge.serve.app import deployment_options

    args = ServeArgs.model_validate(
        {
            "models": [
                {
                    "name": "m",
                    "artifact": "x",
                    "max_batch_size": 8,
                    "max_waiting": 24,
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 4,
                        "target_ongoing_requests": 6,
                    },
                    "resources": {"num_cpus": 2, "num_gpus": 1, "memory_gb": 4},
                }
            ]
        }
    )
    options = deployment_options(args.models[0])
    assert options["name"] == "model-m" and options["max_ongoing_requests"] == 32
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["autoscaling_config"]["target_ongoing_requests"] == 6
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1, "memory": 4 * 2**30}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    # A file, as a mounted Secret: the router replica reads it (an env var would have to be
    # in the replica processes' environment, which the test process does not control).
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text("sk-ray\n")
    return str(path)


@pytest.fixture(scope="module")
def serve_app(ray_local, artifact, key_file):
    """A live Serve app on a free port: the router and two replicas of a tiny model."""
    from ray import serve

    from lmforge.serve.app import build_app

    model = {
        "name": "tiny",
        "artifact": artifact,
        "torch_threads": 1,
        "resources": {"num_cpus": 0.25},
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
    }
    args = ServeArgs(models=[model], api_key_env="LMFORGE_UNSET_ENV", api_key_file=key_file)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="lmforge-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_live_serve_app_answers_the_official_openai_client(serve_app):
    check_openai_client(f"{serve_app}/v1", "sk-ray")


@pytest.mark.ray
@pytest.mark.slow
def test_killing_a_model_replica_under_load_recovers(serve_app, ray_local):
    """Kill one of two model replicas while 4 clients send requests: Serve replaces it, and
    every request after recovery succeeds. Failures during the kill are counted and reported."""
    import threading
    import time

    import httpx2
    from ray import serve

    headers = {"Authorization": "Bearer sk-ray"}
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    outcomes: list[tuple[float, int]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx2.Client(base_url=serve_app, headers=headers, timeout=30) as http:
            while not stop.is_set():
                try:
                    status = http.post("/v1/completions", json=body).status_code
                except httpx2.HTTPError:
                    status = 0
                outcomes.append((time.monotonic(), status))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    replicas = [
        a
        for a in ray_local.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::lmforge-test#model-tiny")
    ]
    assert len(replicas) == 2
    killed_at = time.monotonic()
    ray_local.kill(ray_local.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = serve.status().applications["lmforge-test"]
        running = status.deployments["model-tiny"].replica_states.get("RUNNING", 0)
        if running == 2 and time.monotonic() - killed_at > 3:
            break
        time.sleep(0.5)
    recovered_at = time.monotonic()
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    during = [s for at, s in outcomes if killed_at <= at < recovered_at]
    after = [s for at, s in outcomes if at >= recovered_at + 0.5]
    failed = sum(s != 200 for s in during)
    print(
        f"replica kill: {failed} of {len(during)} requests failed during recovery "
        f"({recovered_at - killed_at:.1f} s); {len(after)} after, all must succeed"
    )
    assert running == 2, "Serve did not replace the killed replica in 90 s"
    assert after and all(s == 200 for s in after)
    assert failed <= 4  # at most the requests in flight on the killed replica


def test_serve_command_reads_a_serve_config_file_and_refuses_a_missing_artifact(cli, tmp_path):
    from lmforge.serve.command import load_serve_args

    args = load_serve_args(str(REPO / "jobs" / "serve_config.yaml"), ["limits.max_n=2"], None)
    assert args.models[0].name == "lmforge-chat" and args.limits.max_n == 2
    code, _, err = cli("serve", "--model", str(tmp_path / "missing"))
    assert code == 2 and "is not a model artifact" in err
    code, _, err = cli("serve")
    assert code == 2 and "nothing to serve" in err


@pytest.mark.ray
@pytest.mark.slow
def test_a_full_replica_is_503_through_serve_and_route_prefix_keeps_auth(
    serve_app, artifact, key_file
):
    from concurrent.futures import ThreadPoolExecutor

    import httpx2
    from ray import serve

    from lmforge.serve.app import build_app

    model = {
        "name": "one",
        "artifact": artifact,
        "max_batch_size": 1,
        "max_waiting": 0,
        "resources": {"num_cpus": 0.25},
    }
    args = ServeArgs(models=[model], api_key_env="LMFORGE_UNSET_ENV", api_key_file=key_file)
    serve.run(build_app(args), name="lmforge-one", route_prefix="/one")
    try:
        url = f"{serve_app}/one"
        assert httpx2.get(f"{url}/health").status_code == 200
        assert httpx2.get(f"{url}/v1/models").status_code == 401
        headers = {"Authorization": "Bearer sk-ray"}
        body = {"model": "one", "prompt": "hello", "max_tokens": 120, "temperature": 0}

        def post(_):
            with httpx2.Client(base_url=url, headers=headers, timeout=60) as http:
                return http.post("/v1/completions", json=body)

        # One slot, no queue: of 6 requests at once, those that reach the busy engine get 503.
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503}, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "overloaded"
    finally:
        serve.delete("lmforge-one")


@pytest.mark.ray
@pytest.mark.slow
def test_request_log_and_feedback_of_two_router_replicas_are_whole_after_shutdown(
    serve_app, artifact, key_file, tmp_path
):
    """Concurrent chat + feedback through two router replicas; rows are buffered (no timed
    flush) and must all be on disk, once each, after the app is deleted (graceful shutdown)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx2
    from ray import serve

    from lmforge.model.artifact import read_version
    from lmforge.serve.app import build_app
    from lmforge.serve.logreader import read_log

    model = {"name": "logged", "artifact": artifact, "resources": {"num_cpus": 0.25}}
    args = ServeArgs(
        models=[model],
        api_key_env="LMFORGE_UNSET_ENV",
        api_key_file=key_file,
        api_replicas=2,
        request_log={"path": str(tmp_path), "flush_seconds": 3600},
        drift={"sample_rate": 1.0},  # every prompt is scored on the model replica too
    )
    serve.run(build_app(args), name="lmforge-log", route_prefix="/log")
    url, headers = f"{serve_app}/log", {"Authorization": "Bearer sk-ray"}
    version = read_version(artifact)["version"]

    def chat_and_rate(i: int) -> tuple[str, str]:
        with httpx2.Client(base_url=url, headers=headers, timeout=60) as http:
            messages = [{"role": "user", "content": f"question {i}, from me@example.com"}]
            body = {"model": "logged", "messages": messages, "max_tokens": 4}
            answer = http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-lmforge-model-version"] == version
            rid = answer.json()["id"]
            rated = http.post("/v1/feedback", json={"completion_id": rid, "rating": i % 3 - 1})
            assert rated.status_code == 200, rated.text
            return rid, rated.json()["id"]

    try:
        with ThreadPoolExecutor(4) as pool:
            sent = list(pool.map(chat_and_rate, range(24)))
        # Drift scores come back from the model replica through its handle, off the request.
        deadline, scraped = time.monotonic() + 30, ""
        while 'lmforge_prompt_bits_per_byte{model="logged"}' not in scraped:
            assert time.monotonic() < deadline, "no drift score reached the router's metrics"
            scraped = httpx2.get(f"{url}/metrics", headers=headers).text
            time.sleep(0.2)
    finally:
        serve.delete("lmforge-log")
    requests, feedback = read_log(str(tmp_path), "requests"), read_log(str(tmp_path), "feedback")
    assert sorted(requests["completion_id"].to_pylist()) == sorted(r for r, _ in sent)
    assert sorted(feedback["feedback_id"].to_pylist()) == sorted(f for _, f in sent)
    assert set(requests["model_version"].to_pylist()) == {version}
    assert all("me@example.com" not in m for m in requests["messages_json"].to_pylist())
    print(f"rows from router replicas: {sorted(set(requests['replica'].to_pylist()))}")
