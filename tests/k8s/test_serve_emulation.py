"""Serving emulation: deploy manifests/rayservice.yaml's serveConfigV2 the way KubeRay does.

KubeRay starts the RayService's cluster (token auth from authOptions), PUTs `serveConfigV2` to
the head's dashboard Serve API (`/api/serve/applications/`, what `serve deploy` sends) and, once
the application is RUNNING, points the Serve Service at the pods. Here the same PUT, with the
cluster's token, goes to a local head (dashboard on, token auth), with what differs between the
pod and this machine mapped onto local files:

- the model on the storage mount (`/mnt/lmforge/runs/<path>`) -> a tiny random-init model saved
  as training saves one (a run dir holding model/) at `<temp PVC>/runs/<path>`;
- the API keys file (`api_key_file`) -> a local file with one key, after checking that the
  RayService's pods mount the API keys Secret there;
- `http_options` 0.0.0.0:8000 -> 127.0.0.1 on a free port (everything runs on one machine).

Then an OpenAI completions request with the key answers 200 with a completion, and one without
a key answers 401.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.k8s.conftest import MANIFESTS, EmulatedRayCluster, free_port, manifest_docs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STORAGE_MOUNT = "/mnt/lmforge"  # storage.mountPath of the values manifests/ is rendered with
DEPLOY_TIMEOUT_S = 150
KEY = "sk-emulated-0123"


def _rayservice() -> dict:
    (service,) = [
        d for d in manifest_docs(MANIFESTS / "rayservice.yaml") if d["kind"] == "RayService"
    ]
    return service


def _secret_file(pod: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) of the Secret item the pod's first container sees at `path`."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in pod["containers"][0]["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        secret = volumes[mount["name"]].get("secret")
        if secret and path.startswith(prefix) and mount.get("readOnly"):
            for item in secret["items"]:
                if item["path"] == path[len(prefix) :]:
                    return secret["secretName"], item["key"]
    raise AssertionError(f"no read-only Secret mount provides {path}")


def _request(url: str, body: dict, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.timeout(DEPLOY_TIMEOUT_S + 120)
def test_rayservice_serve_config_deploys_and_answers(tmp_path):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeDeploySchema

    from lmforge.cluster import ensure_token
    from tests.serve.conftest import make_artifact

    service = _rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # what the dashboard's Serve API accepts
    (app,) = config["applications"]
    assert app["import_path"] == "lmforge.serve.app:build_app"
    args = app["args"]

    # Every Ray pod of the RayService (the router may run on any of them) mounts the keys.
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster.get("workerGroupSpecs") or []]
    secrets = {_secret_file(pod, args["api_key_file"]) for pod in pods}
    assert secrets == {("lmforge-api-keys", "api-keys")}
    assert all(
        {"name": "serve", "containerPort": config["http_options"]["port"]}
        in pod["containers"][0]["ports"]
        for pod in pods
    )

    # The pod's files, here: the model on the PVC and the mounted Secret.
    pvc = tmp_path / "pvc"
    (model,) = args["models"]
    assert model["artifact"].startswith(STORAGE_MOUNT + "/")
    run_dir = pvc / model["artifact"][len(STORAGE_MOUNT) + 1 :]
    make_artifact(run_dir / "model")  # a training run dir, as `lmforge train` leaves it
    model["artifact"] = str(run_dir)
    keys = tmp_path / "api-keys"
    keys.write_text(KEY + "\n")
    args["api_key_file"] = str(keys)
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)

    ensure_token()
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    ray_cluster = EmulatedRayCluster(workdir, workers=0)
    ray_cluster.start()
    try:
        client = ServeSubmissionClient(ray_cluster.dashboard_url)
        client.deploy_applications(config)
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while True:
            status = client.get_serve_details().get("applications", {}).get(app["name"], {})
            if status.get("status") == "RUNNING":
                break
            assert status.get("status") != "DEPLOY_FAILED", status.get("message")
            assert time.monotonic() < deadline, f"not RUNNING after {DEPLOY_TIMEOUT_S}s: {status}"
            time.sleep(1)

        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": model["name"], "prompt": "hello world", "max_tokens": 4, "temperature": 0}
        code, answer = _request(url, body, KEY)
        assert code == 200, answer
        (choice,) = answer["choices"]
        assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")
        assert 1 <= answer["usage"]["completion_tokens"] <= 4
        assert answer["model"] == model["name"]
        code, _ = _request(url, body, None)
        assert code == 401
    finally:
        ray_cluster.stop()
