"""The Serve application: config validation, deployment options, and a live local Serve app."""

from __future__ import annotations

import socket

import pytest

from lmforge import ConfigError
from lmforge.config import load_config
from lmforge.serve.config import ServeArgs
from tests.conftest import REPO
from tests.serve.test_live import check_openai_client


def test_shipped_serve_config_is_a_valid_serve_config():
    import yaml

    config = yaml.safe_load((REPO / "jobs" / "serve_config.yaml").read_text())
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_live_serve_app_answers_the_official_openai_client(ray_local, artifact, monkeypatch):
    from ray import serve

    from lmforge.serve.app import build_app

    monkeypatch.setenv("LMFORGE_TEST_RAY_KEYS", "sk-ray")
    model = {"name": "tiny", "artifact": artifact, "resources": {"num_cpus": 0.5}}
    args = ServeArgs(models=[model], api_key_env="LMFORGE_TEST_RAY_KEYS")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="lmforge-test", route_prefix="/")
        check_openai_client(f"http://127.0.0.1:{port}/v1", "sk-ray")
    finally:
        serve.shutdown()


def test_serve_command_reads_a_serve_config_file_and_refuses_a_missing_artifact(cli, tmp_path):
    from lmforge.serve.command import load_serve_args

    args = load_serve_args(str(REPO / "jobs" / "serve_config.yaml"), ["limits.max_n=2"], None)
    assert args.models[0].name == "lmforge-chat" and args.limits.max_n == 2
    code, _, err = cli("serve", "--model", str(tmp_path / "missing"))
    assert code == 2 and "is not a model artifact" in err
    code, _, err = cli("serve")
    assert code == 2 and "nothing to serve" in err
