"""helm lint, helm template and schema validation of every object the chart renders."""

from __future__ import annotations

import re
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from tests.k8s.conftest import (
    CHART,
    CI_VALUES,
    VALUE_SETS,
    crd_validator,
    helm,
    pod_specs,
    ray_cluster_specs,
    rayjob_specs,
    render,
    render_error,
)

KUBERNETES_VERSION = "1.35.0"
# Kinds of optional add-ons whose CRDs are not in ../shared: checked by apiVersion only.
ADDON_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),  # structurally: tests/k8s/test_monitoring.py
}


@pytest.mark.parametrize(
    "values", [None, *CI_VALUES], ids=["default", *[p.stem for p in CI_VALUES]]
)
def test_helm_lint_strict(values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(("values", "sets"), VALUE_SETS)
def test_every_object_validates(values, sets):
    objects = render(*values, sets=sets)
    kinds = {o["kind"] for o in objects}
    assert {"ServiceAccount", "NetworkPolicy"} <= kinds and kinds & {"RayJob", "RayService"}
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"] == "ray.io/v1":
            error = jsonschema.exceptions.best_match(crd_validator(obj["kind"]).iter_errors(obj))
            if error is not None:
                pytest.fail(
                    f"{where} is not a valid KubeRay v1.7.0 {obj['kind']}: "
                    f"{error.message} at {list(error.absolute_path)}"
                )
        elif (obj["apiVersion"], obj["kind"]) in ADDON_KINDS:
            assert obj["spec"], where
        else:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(
                    f"{where} is not valid Kubernetes {KUBERNETES_VERSION}: {e.message} at {list(e.path)}"
                )


@pytest.mark.parametrize(("values", "sets"), VALUE_SETS)
def test_rayjobs_keep_kuberays_own_rules(values, sets):
    """Rules the KubeRay controller enforces beyond its CRD schema (a violation fails the RayJob)."""
    for name, spec in rayjob_specs(render(*values, sets=sets)):
        assert bool(spec.get("clusterSelector")) != bool(spec.get("rayClusterSpec")), name
        if not spec["shutdownAfterJobFinishes"]:
            assert spec.get("ttlSecondsAfterFinished", 0) == 0, f"{name}: a TTL needs shutdown"
        if spec.get("clusterSelector"):
            assert not spec.get("suspend") and not spec["shutdownAfterJobFinishes"], name
        assert spec["submissionMode"] == "K8sJobMode" and spec["entrypoint"].startswith(
            "python jobs/"
        )


def test_crd_validation_catches_a_typo():
    """The strict CRD schema is what makes the test above worth having: a typo fails."""
    job = next(o for o in render() if o["kind"] == "RayJob")
    job["spec"]["shutdownAfterJobFinish"] = True
    errors = [e.message for e in crd_validator("RayJob").iter_errors(job)]
    assert len(errors) == 1 and "'shutdownAfterJobFinish' was unexpected" in errors[0]


SERVE_ON = (
    "serve.enabled=true",
    "serve.apiKeys.secretName=lmforge-api-keys",
    "serve.models.lmforge-chat.artifact=train/base-0123456789ab",
)


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        (("ray.workerGroups.cpu.replicas=-1",), "/ray/workerGroups/cpu/replicas"),
        (("stages.check.enabeld=true",), "enabeld"),
        (("storage.type=nfs",), "/storage/type"),
        (("image.flavor=tpu",), "/image/flavor"),
        (("storage.type=objectStore",), "storage.objectStore.uri"),
        (
            ("ray.workerGroups.gpu.enabled=true",),
            "ray.workerGroups.gpu.gpus is 8 but image.flavor is cpu",
        ),
        (
            ("ray.workerGroups.cpu.minReplicas=5",),
            "ray.workerGroups.cpu.minReplicas (5) is greater than maxReplicas (4)",
        ),
        (("ray.version=2.40.0",), "ray.version is 2.40.0"),
        (("rayCluster.enabled=true", "jobs.kueue.queueName=q"), "jobs.kueue.queueName"),
        (
            ("rayCluster.enabled=true", "jobs.clusterName=other"),
            "jobs.clusterName and rayCluster.enabled",
        ),
        (("stages.check.job=../evil",), "/stages/check/job"),
        (("image.repository=",), "/image/repository"),
        (("rayCluster.enabled=true", "jobs.suspend=true"), "stages.check: suspend"),
        (("serve.enabled=true",), "serve.apiKeys.secretName is empty"),
        (
            ("serve.enabled=true", "serve.apiKeys.secretName=k"),
            "serve.models.lmforge-chat.artifact is empty",
        ),
        (
            (*SERVE_ON, "serve.modelDefaults.autoscaling.minReplicas=5"),
            "serve.models.lmforge-chat.autoscaling.minReplicas (5) is greater than maxReplicas (4)",
        ),
        (
            (*SERVE_ON, "serve.models.lmforge-chat.resources.numGpus=1"),
            "serve.models.lmforge-chat.resources.numGpus",
        ),
        ((*SERVE_ON, "serve.upgradeStrategy=Rolling"), "/serve/upgradeStrategy"),
        ((*SERVE_ON, "serve.port=8265"), "serve.port is 8265"),
        ((*SERVE_ON, "serve.models.lmforge-chat.maxBatchSize=0"), "maxBatchSize"),
        ((*SERVE_ON, "serve.models.lmforge-chat.artfact=x"), "artfact"),
        (
            (*SERVE_ON, "serve.cluster.workerGroups.cpu.minReplicas=9"),
            "ray.workerGroups.cpu.minReplicas (9)",
        ),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_invalid_value_fails_naming_it(sets, named):
    assert named in render_error(*sets)


def test_bad_override_fails_naming_it():
    err = render_error("stages.check.overrides[0]=name=it's")
    assert "stages/check/overrides/0" in err or "stages.check.overrides[0]" in err


def undocumented_keys(values_yaml: str) -> list[str]:
    """Values without a `# --` comment (dotted paths).

    A key with a comment and no commented key below it is documented as a whole (e.g. a
    `resources:` block); a key with commented keys below it is a group, and each of its
    children must be documented in turn, like helm-docs lists them.
    """
    root: dict = {"children": [], "comment": False, "indent": -1, "key": ""}
    stack, comment = [root], False
    for line in values_yaml.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = True
            continue
        key = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):", line)
        if not key:  # a blank line, another comment, a list item: not a key of its own
            continue
        node = {
            "children": [],
            "comment": comment,
            "indent": len(key.group(1)),
            "key": key.group(2),
        }
        comment = False
        while stack[-1]["indent"] >= node["indent"]:
            stack.pop()
        stack[-1]["children"].append(node)
        stack.append(node)

    def has_docs(node: dict) -> bool:
        return any(c["comment"] or has_docs(c) for c in node["children"])

    missing: list[str] = []

    def walk(node: dict, path: str) -> None:
        for child in node["children"]:
            dotted = f"{path}{child['key']}"
            if not has_docs(child):
                if not child["comment"]:
                    missing.append(dotted)
            else:
                walk(child, dotted + ".")

    walk(root, "")
    return missing


def test_every_value_is_documented():
    """values.yaml is the chart's API: every value has a `# --` comment, or sits under one that has."""
    text = (CHART / "values.yaml").read_text()
    assert undocumented_keys(text) == []
    without_one = re.sub(r"^ *# -- Pods at start\.\n", "", text, count=1, flags=re.M)
    assert undocumented_keys(without_one) == ["ray.workerGroups.cpu.replicas"]


def test_ray_version_is_the_one_pin():
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(p for p in pins if p.startswith("ray[")).split("==")[1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert values["ray"]["version"] == ray_pin
    assert chart["annotations"]["lmforge.dev/ray-version"] == ray_pin
    assert f"ARG RAY_VERSION={ray_pin}" in (REPO / "Dockerfile").read_text()
    import lmforge

    assert (
        chart["appVersion"] == lmforge.__version__
    )  # the default image tag is <appVersion>-<flavor>
    for obj in render():
        for _, cluster in ray_cluster_specs(obj):
            assert cluster["rayVersion"] == ray_pin


def test_one_ray_pod_template_for_head_and_workers():
    """The pod spec is written once (lmforge.rayPodTemplate); head and workers differ only where they must."""
    templates = "".join(p.read_text() for p in (CHART / "templates").iterdir())
    assert templates.count('define "lmforge.rayPodTemplate"') == 1
    # the Ray pod template, the job submitter and the bundled MLflow server
    assert templates.count("containers:") == 3
    job = next(
        o
        for o in render(sets=("stages.pretrain.enabled=true",))
        if o["metadata"]["name"] == "lmforge-pretrain"
    )
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (gpu,) = cluster["workerGroupSpecs"]
    worker = gpu["template"]["spec"]
    assert head["securityContext"] == worker["securityContext"]
    assert head["containers"][0]["securityContext"] == worker["containers"][0]["securityContext"]
    assert {v["name"] for v in head["volumes"]} - {v["name"] for v in worker["volumes"]} == {
        "job-configs"
    }


def test_stage_cluster_and_image_overrides():
    objects = render(sets=("stages.pretrain.enabled=true",))
    jobs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "RayJob"}
    check = jobs["lmforge-check"]["spec"]["rayClusterSpec"]
    pretrain = jobs["lmforge-pretrain"]["spec"]["rayClusterSpec"]
    assert [g["groupName"] for g in check["workerGroupSpecs"]] == ["cpu"]
    assert [g["groupName"] for g in pretrain["workerGroupSpecs"]] == ["gpu"]
    gpu_pod = pretrain["workerGroupSpecs"][0]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert gpu_pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod[
        "tolerations"
    ]
    assert gpu_pod["containers"][0]["image"].endswith("-gpu")
    assert check["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith("-cpu")
    shm = next(v for v in gpu_pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_rayjob_lifecycle_fields():
    (job,) = [o for o in render() if o["kind"] == "RayJob"]
    spec = job["spec"]
    assert spec["entrypoint"] == "python jobs/check.py -c job-configs/check.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 900  # the check's own
    assert "suspend" not in spec and "clusterSelector" not in spec
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {
        "env_vars": {"PYTHONUNBUFFERED": "1", "LMFORGE_STAGE": "check"}
    }


def test_finetune_rayjob_starts_from_the_pretrain_run_and_evaluate_can_follow_it():
    """stages.finetune: off by default; on, a GPU RayJob whose `base` names the pretrain RayJob's
    run, and whose own run evaluate (and serving) can name as `@finetune/<name>`."""
    from lmforge.eval.config import EvalConfig
    from lmforge.finetune.config import FinetuneConfig

    assert "lmforge-finetune" not in {o["metadata"]["name"] for o in render()}
    objects = render(
        sets=(
            "stages.pretrain.enabled=true",
            "stages.finetune.enabled=true",
            "stages.evaluate.enabled=true",
            "stages.evaluate.config.model=@finetune/chat",
        )
    )
    jobs = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "RayJob"}
    configs = {
        o["metadata"]["name"]: yaml.safe_load(o["data"]["config.yaml"])
        for o in objects
        if o["kind"] == "ConfigMap"
    }
    spec = jobs["lmforge-finetune"]
    assert spec["entrypoint"] == "python jobs/finetune.py -c job-configs/finetune.yaml"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["LMFORGE_STAGE"] == "finetune"
    assert spec["backoffLimit"] == 1 and spec["ttlSecondsAfterFinished"] == 600
    cluster = spec["rayClusterSpec"]
    (gpu,) = cluster["workerGroupSpecs"]
    container = gpu["template"]["spec"]["containers"][0]
    assert gpu["groupName"] == "gpu" and gpu["replicas"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["image"] == "ghcr.io/lmforge/lmforge:0.1.0-gpu"
    head = cluster["headGroupSpec"]["template"]["spec"]
    (configs_volume,) = [v for v in head["volumes"] if v["name"] == "job-configs"]
    assert configs_volume["projected"]["sources"] == [
        {
            "configMap": {
                "name": "lmforge-finetune-config",
                "items": [{"key": "config.yaml", "path": "finetune.yaml"}],
            }
        }
    ]
    finetune = configs["lmforge-finetune-config"]
    assert finetune == {
        "name": "chat",
        "base": "@train/base",
        "resources": {"num_workers": 8, "gpus_per_worker": 1},
        "runs_dir": "/mnt/lmforge/runs",
    }
    assert finetune["base"] == f"@train/{configs['lmforge-pretrain-config']['name']}"
    # one Ray Train worker per GPU of the gpu group
    assert FinetuneConfig.model_validate(finetune).resources.num_workers == 8 * gpu["replicas"]
    evaluate = EvalConfig.model_validate(configs["lmforge-evaluate-config"])
    assert evaluate.model == f"@finetune/{finetune['name']}"


def test_overrides_are_quoted_into_the_entrypoint():
    objects = render(sets=("stages.check.overrides={min_cpus=3,name=a b}",))
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    assert job["spec"]["entrypoint"].endswith("--set 'min_cpus=3' --set 'name=a b'")


def test_kueue_suspends_and_labels():
    objects = render(str(CHART / "ci" / "gpu-multinode.yaml"))
    jobs = [o for o in objects if o["kind"] == "RayJob"]
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        "lmforge-check",
        "lmforge-finetune",
        "lmforge-prepare-data",
        "lmforge-pretrain",
    ]
    for job in jobs:
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert job["spec"]["suspend"] is True
        assert job["spec"]["activeDeadlineSeconds"] == (
            900 if job["metadata"]["name"] == "lmforge-check" else 259200
        )


def test_existing_cluster_uses_cluster_selector():
    objects = render(str(CHART / "ci" / "existing-cluster.yaml"))
    (cluster,) = [o for o in objects if o["kind"] == "RayCluster"]
    jobs = list(rayjob_specs(objects))  # two stages and the improvement RayCronJob's template
    assert len(jobs) == 3
    for _, spec in jobs:
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert "rayClusterSpec" not in spec
        assert spec["shutdownAfterJobFinishes"] is False
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (configs,) = [v for v in head["volumes"] if v["name"] == "job-configs"]
    paths = [s["configMap"]["items"][0]["path"] for s in configs["projected"]["sources"]]
    assert paths == ["check.yaml", "improve.yaml", "prepare-data.yaml"]
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "team-ray-token"}
    assert not [o for o in objects if o["kind"] == "Secret"]  # the existing one is used


def test_storage_choices():
    obj_store = render(str(CHART / "ci" / "gpu-multinode.yaml"))
    cm = next(o for o in obj_store if o["metadata"]["name"] == "lmforge-pretrain-config")
    assert yaml.safe_load(cm["data"]["config.yaml"])["runs_dir"] == "s3://lmforge-runs/team-a"
    assert not [o for o in obj_store if o["kind"] == "PersistentVolumeClaim"]
    for obj in obj_store:
        for where, pod in pod_specs(obj):
            if "submitter" not in where:
                assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "lmforge-s3"}}], (
                    where
                )
    default = render()
    (pvc,) = [o for o in default if o["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cm = next(o for o in default if o["kind"] == "ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"])["runs_dir"] == "/mnt/lmforge/runs"
    user_set = render(sets=("stages.check.config.runs_dir=/elsewhere",))
    cm = next(o for o in user_set if o["kind"] == "ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"])["runs_dir"] == "/elsewhere"


def test_generated_token_secret():
    (secret,) = [o for o in render() if o["kind"] == "Secret"]
    import base64

    token = base64.b64decode(secret["data"]["auth_token"]).decode()
    assert len(token) == 64 and token.isalnum()


def test_monitoring_objects():
    objects = render(
        sets=("monitoring.podMonitor.enabled=true", "monitoring.grafanaDashboard.enabled=true")
    )
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    dashboard = next(o for o in objects if o["metadata"]["name"].endswith("grafana-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    import json

    panels = json.loads(dashboard["data"]["lmforge.json"])["panels"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Training", "Serving", "Quality and feedback"]
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    assert "ray_lmforge_train_loss" in exprs and "ray_lmforge_requests_total" in exprs
    # every serving series the dashboard plots is one Ray's metrics agent exports of the app's
    from lmforge.serve.metrics import ray_series

    used = {m for m in re.findall(r"\b(?:ray_)?lmforge_[a-z_]+", exprs)
            if not m.startswith("ray_lmforge_train_")}  # fmt: skip
    assert used and used <= ray_series(), used - ray_series()
    # and every training series is a gauge the training loop sets (with Ray's ray_ prefix)
    from lmforge.train.metrics import exported_names

    trained = set(re.findall(r"\bray_lmforge_train_[a-z_]+", exprs))
    assert trained and trained <= exported_names(), trained - exported_names()


def test_dockerfile_matches_the_chart():
    """The image is built the way the chart runs it: non-root, jobs/ and job-configs/ in the workdir."""
    dockerfile = (REPO / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    instructions = [
        line.split(None, 1) for line in dockerfile.splitlines() if line and not line.startswith("#")
    ]
    keywords = [i[0] for i in instructions if i[0].isupper()]
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${FLAVOR}" in dockerfile
    assert [i[1] for i in instructions if i[0] == "USER"] == [
        "ray"
    ]  # uid 1000, the chart's runAsUser
    assert keywords.index("USER") < keywords.index("RUN")  # nothing is installed as root
    assert f"WORKDIR {values['image']['workdir']}" in dockerfile
    assert (
        "COPY --chown=ray:users jobs ./jobs" in dockerfile and "mkdir -p job-configs" in dockerfile
    )
    assert not re.search(
        r"(?i)^(ENV|ARG)\s+\S*(TOKEN|SECRET|PASSWORD|ACCESS_KEY)", dockerfile, re.M
    )
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)
