"""The chart's experiment tracking: `tracking.uri` reaches every Ray container (driver and
training workers) as MLFLOW_TRACKING_URI; the optional bundled MLflow server is a restricted
pod with its Service, PVC and NetworkPolicy, and the Ray pods log to it."""

from __future__ import annotations

from tests.k8s.conftest import pod_specs, render

RAY_KINDS = ("RayJob", "RayCronJob", "RayCluster", "RayService")


def ray_container_envs(objects) -> dict[str, dict[str, str]]:
    """where -> env (name -> value) of every Ray container (not the job submitters)."""
    out = {}
    for obj in objects:
        if obj["kind"] not in RAY_KINDS:
            continue
        for where, pod in pod_specs(obj):
            if "submitter" in where:
                continue
            for c in pod["containers"]:
                if c["name"].startswith("ray-") or c["name"] in ("ray-head", "ray-worker"):
                    out[f"{where}/{c['name']}"] = {
                        e["name"]: e.get("value") for e in c.get("env", [])
                    }
    return out


STAGES_ON = ("stages.pretrain.enabled=true", "stages.finetune.enabled=true")


def test_no_tracking_uri_by_default():
    objects = render(sets=STAGES_ON)
    envs = ray_container_envs(objects)
    assert envs and all("MLFLOW_TRACKING_URI" not in env for env in envs.values())
    assert not [o for o in objects if "mlflow" in o["metadata"]["name"]]


def test_tracking_uri_reaches_every_ray_container():
    uri = "http://mlflow.tracking.svc:5000"
    envs = ray_container_envs(render(sets=(*STAGES_ON, f"tracking.uri={uri}")))
    assert len(envs) >= 4  # heads and workers of both stages' clusters
    assert {where: env.get("MLFLOW_TRACKING_URI") for where, env in envs.items()} == {
        where: uri for where in envs
    }


def test_the_bundled_server_is_restricted_and_the_ray_pods_log_to_it():
    objects = render(sets=(*STAGES_ON, "tracking.server.enabled=true"))
    mine = {
        (o["kind"], o["metadata"]["name"]): o for o in objects if "mlflow" in o["metadata"]["name"]
    }
    assert set(mine) == {
        ("ServiceAccount", "lmforge-mlflow"),
        ("PersistentVolumeClaim", "lmforge-mlflow"),
        ("Deployment", "lmforge-mlflow"),
        ("Service", "lmforge-mlflow"),
        ("NetworkPolicy", "lmforge-mlflow"),
    }
    pod = mine[("Deployment", "lmforge-mlflow")]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in c["args"]
    assert pod["automountServiceAccountToken"] is False
    service = mine[("Service", "lmforge-mlflow")]["spec"]
    assert service["ports"][0]["port"] == 5000
    uri = "http://lmforge-mlflow.default.svc:5000"
    envs = ray_container_envs(objects)
    assert envs and {env.get("MLFLOW_TRACKING_URI") for env in envs.values()} == {uri}
    policy = mine[("NetworkPolicy", "lmforge-mlflow")]["spec"]
    assert policy["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "lmforge"}}}],
            "ports": [{"protocol": "TCP", "port": 5000}],
        }
    ]


def test_an_explicit_uri_wins_over_the_bundled_server():
    objects = render(sets=(*STAGES_ON, "tracking.server.enabled=true", "tracking.uri=http://x:1"))
    assert {e.get("MLFLOW_TRACKING_URI") for e in ray_container_envs(objects).values()} == {
        "http://x:1"
    }
