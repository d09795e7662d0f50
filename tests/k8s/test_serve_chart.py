"""The serving RayService: its serveConfigV2 is what lmforge's Serve app takes, its pods are the
chart's one Ray pod template plus the Serve port and the API keys Secret, and it is off by default."""

from __future__ import annotations

import yaml

from tests.k8s.conftest import CHART, render
from tests.k8s.test_chart import SERVE_ON


def _rayservice(*values, sets=()) -> dict:
    (service,) = [o for o in render(*values, sets=sets) if o["kind"] == "RayService"]
    return service


def _serve_args(service: dict) -> dict:
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app["args"]


def test_serving_is_off_by_default():
    assert not [o for o in render() if o["kind"] == "RayService"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["serve"]["enabled"] is False


def test_serve_config_is_lmforge_serve_args():
    from ray.serve.schema import ServeDeploySchema

    from lmforge.serve.config import ServeArgs

    sets = (
        *SERVE_ON,
        "serve.models.a-abs.artifact=/models/a",
        "serve.models.b-uri.artifact=s3://bucket/models/b",
        "serve.models.b-uri.autoscaling.minReplicas=0",
        "serve.models.b-uri.autoscaling.targetOngoingRequests=3",
        "serve.models.b-uri.resources.numCpus=2",
        "serve.limits.maxTokens=256",
        "serve.apiReplicas=3",
        "serve.port=8001",
    )
    service = _rayservice(sets=sets)
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # what KubeRay hands to the dashboard's Serve API
    (app,) = config["applications"]
    assert app["import_path"] == "lmforge.serve.app:build_app" and app["route_prefix"] == "/"
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8001}
    args = ServeArgs.model_validate(app["args"])  # what build_app validates; strict: no extras
    by_name = {m.name: m for m in args.models}
    assert sorted(by_name) == ["a-abs", "b-uri", "lmforge-chat"]
    assert by_name["lmforge-chat"].artifact == "/mnt/lmforge/runs/train/base-0123456789ab"
    assert by_name["a-abs"].artifact == "/models/a"
    assert by_name["b-uri"].artifact == "s3://bucket/models/b"
    b = by_name["b-uri"]
    assert (b.autoscaling.min_replicas, b.autoscaling.max_replicas) == (0, 4)
    assert b.autoscaling.target_ongoing_requests == 3 and b.resources.num_cpus == 2
    chat = by_name["lmforge-chat"]
    assert (chat.max_batch_size, chat.max_waiting, chat.autoscaling.downscale_delay_s) == (
        16,
        256,
        300,
    )
    assert args.limits.max_tokens == 256 and args.api_replicas == 3
    assert args.api_key_file == "/etc/lmforge/api-keys/api-keys"
    ports = service["spec"]["serveService"]["spec"]["ports"]
    assert ports == [{"name": "serve", "port": 8001, "targetPort": 8001, "protocol": "TCP"}]


def test_artifacts_on_an_object_store_are_uris():
    sets = (*SERVE_ON, "storage.type=objectStore", "storage.objectStore.uri=s3://runs/team/")
    (model,) = _serve_args(_rayservice(sets=sets))["models"]
    assert model["artifact"] == "s3://runs/team/train/base-0123456789ab"


def test_rayservice_pods_are_the_ray_pod_template_plus_serving():
    """Same pod spec as a stage's cluster; only the Serve port and the keys Secret are added."""
    objects = render(sets=SERVE_ON)
    service = next(o for o in objects if o["kind"] == "RayService")
    job = next(o for o in objects if o["kind"] == "RayJob")
    serve_cluster, job_cluster = service["spec"]["rayClusterConfig"], job["spec"]["rayClusterSpec"]
    # token auth on both, each with its own token (tests/k8s/test_isolation.py)
    assert serve_cluster["authOptions"]["mode"] == job_cluster["authOptions"]["mode"] == "token"
    assert serve_cluster["authOptions"]["secretName"] != job_cluster["authOptions"]["secretName"]
    pairs = [(serve_cluster["headGroupSpec"], job_cluster["headGroupSpec"])]
    pairs += list(
        zip(serve_cluster["workerGroupSpecs"], job_cluster["workerGroupSpecs"], strict=True)
    )
    for serve_group, job_group in pairs:
        pod, other = serve_group["template"]["spec"], job_group["template"]["spec"]
        container, other_container = pod["containers"][0], other["containers"][0]
        assert {"name": "serve", "containerPort": 8000} in container["ports"]
        mount = {"name": "api-keys", "mountPath": "/etc/lmforge/api-keys", "readOnly": True}
        assert mount in container["volumeMounts"]
        secret = next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]
        assert secret == {
            "secretName": "lmforge-api-keys",
            "items": [{"key": "api-keys", "path": "api-keys"}],
        }
        assert container["securityContext"] == other_container["securityContext"]
        assert pod["securityContext"] == other["securityContext"]
        assert (
            container["env"] == other_container["env"]
            and container["image"] == other_container["image"]
        )
        strip = lambda p: [x for x in p if x.get("name") not in ("api-keys", "job-configs")]  # noqa: E731
        assert strip(pod["volumes"]) == strip(other["volumes"])
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


def test_serving_only_values(tmp_path):
    objects = render(CHART / "ci" / "serving-only.yaml")
    assert not [o for o in objects if o["kind"] in ("RayJob", "ConfigMap")]
    service = next(o for o in objects if o["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    container = gpu["template"]["spec"]["containers"][0]
    assert (
        container["image"].endswith("-gpu")
        and container["resources"]["limits"]["nvidia.com/gpu"] == 4
    )
    (model,) = _serve_args(service)["models"]
    assert model["resources"] == {"num_cpus": 4, "num_gpus": 1}
    (policy,) = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "lmforge-serve"
    ]
    serve_rule = next(
        r
        for r in policy["spec"]["ingress"]
        if {"protocol": "TCP", "port": 8000} in r.get("ports", [])
    )
    assert serve_rule["from"] == [
        RELEASE_PODS,
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
    ]


def test_serve_port_is_closed_without_serve_clients():
    """Without serve.allowedClients only this release's pods reach the Serve port."""
    policies = [o for o in render(sets=SERVE_ON) if o["kind"] == "NetworkPolicy"]
    opening = [
        (p["metadata"]["name"], r["from"])
        for p in policies
        for r in p["spec"]["ingress"]
        if any(port["port"] == 8000 for port in r.get("ports", []))
    ]
    assert opening == [("lmforge-serve", [RELEASE_PODS])]


RELEASE_PODS = {
    "podSelector": {
        "matchLabels": {
            "app.kubernetes.io/name": "lmforge",
            "app.kubernetes.io/instance": "lmforge",
        }
    }
}
