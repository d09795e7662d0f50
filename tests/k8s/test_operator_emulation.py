"""Operator emulation: run each RayJob in manifests/ the way KubeRay would, on a real local Ray.

For a RayJob, KubeRay starts the pods of its rayClusterSpec (`ray start` in the image's working
directory, token auth from authOptions), then its submitter runs
`ray job submit --runtime-env-json <runtimeEnvYAML as JSON> -- <entrypoint>` against the head's
dashboard and follows the job. Here:

- the cluster: a local head plus one node per enabled worker group (`ray start`, 2 logical
  CPUs each, RAY_AUTH_MODE=token), started in a directory laid out like the image's working
  directory; RayJobs whose clusters have the same shape share one emulated cluster;
- the pod's files, mapped onto local ones:
    <workdir>/jobs/                 -> the repository's jobs/ (the image COPYs it there)
    <workdir>/job-configs/<s>.yaml  -> the stage's ConfigMap data, as the projected volume
                                       mounts it; with changes for a laptop-sized run:
                                       jobs/configs/<job>-tiny.yaml, when it exists, replaces
                                       it (the ConfigMap's own config is validated by
                                       test_manifests), SHORTER caps long stages to a few
                                       steps, and `runs_dir` under the storage mount
                                       (/mnt/lmforge) moves to a temp dir (the PVC)
    /mnt/lmforge (the PVC)          -> a temp dir shared by every node, as the PVC is
- `python` in the entrypoint: the image's interpreter (the one with lmforge installed), here
  this test's interpreter, put first on the nodes' PATH;
- the submission: the RayJob's exact `entrypoint` string and its `runtimeEnvYAML`, through the
  Ray Jobs SDK with the cluster's token, exactly what the submitter's `ray job submit` sends.

Stages run in pipeline order (the stage registry's: check, data, train, finetune, eval). A
stage's input (train's data.path, finetune's base, eval's model) that the
ConfigMap gives as `@<stage>/<run name>` is left for the job to resolve from the shared storage,
as on the cluster (a tiny config keeps the ConfigMap's run name for this); any other input gets
the output of the stage before it, as `lmforge pipeline run` passes it. A RayJob whose job script does not exist
yet, or whose stage is not registered yet, is skipped with the reason.

The RayService: KubeRay starts its cluster (token auth), PUTs `serveConfigV2` to the head's
dashboard Serve API (`/api/serve/applications/`, what `serve deploy` sends) and, once the
application is RUNNING, points the Serve Service at the pods. Here the same PUT, with the
cluster's token, goes to the emulated cluster of the same shape, with what differs between the
pods and this machine mapped: the model on the storage mount (`/mnt/lmforge/runs/<path>`) -> the
training run the pretrain RayJob left here (or, when it was not emulated, a tiny random-init
model saved as training saves one);
the API keys file -> a local file with one key, after checking that every pod of the
RayService mounts the keys Secret there; `http_options` 0.0.0.0:8000 -> 127.0.0.1 on a free port,
and one proxy (HeadOnly) since every node shares one machine. Then an OpenAI completions request
with the key answers 200 with a completion, and one without a key answers 401.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.k8s.conftest import (
    MANIFESTS,
    EmulatedRayCluster,
    free_port,
    manifest_docs,
    rayjob_entrypoint_config,
    stage_for_job,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STORAGE_MOUNT = "/mnt/lmforge"  # storage.mountPath of the chart's values used for manifests/
JOB_TIMEOUT_S = 240
DEPLOY_TIMEOUT_S = 150
KEY = "sk-emulated-0123"
# Stage name -> config values that keep a long stage to seconds here (merged over the tiny config).
SHORTER = {
    "train": {
        "train": {"max_steps": 4, "log_every": 1, "eval_every": 2, "eval_sequences": 8},
        "checkpoint": {"every_steps": 2},
    }
}


def _rayjobs_in_pipeline_order() -> list[Path]:
    # The stage registry lists stages in pipeline order (check, data, train, finetune, ..., eval),
    # optional ones such as finetune included, unlike DEFAULT_PIPELINE.
    from lmforge.stage import STAGES

    order_of = list(STAGES)

    def order(path: Path) -> int:
        docs = manifest_docs(path)
        job = next(d for d in docs if d["kind"] == "RayJob")
        stage = stage_for_job(rayjob_entrypoint_config(docs, job)[0])
        return order_of.index(stage.name) if stage and stage.name in order_of else 99

    return sorted(MANIFESTS.glob("rayjob.*.yaml"), key=order)


RAYJOBS = _rayjobs_in_pipeline_order()
OUTPUTS: dict[str, str] = {}  # stage name -> output directory of its emulated run


def _pod_config(text: str, job: str, storage: Path, stage) -> str:
    """The ConfigMap's config as this emulation's pod sees it (see the module docstring)."""
    from lmforge.config.schema import model_of as _model_of

    configmap = cfg = yaml.safe_load(text) or {}
    runs_dir = str(cfg.get("runs_dir", ""))
    tiny = REPO / "jobs" / "configs" / f"{job}-tiny.yaml"
    if tiny.exists():  # a whole config of its own, sized for a laptop: it replaces the ConfigMap's
        cfg = yaml.safe_load(tiny.read_text()) or {}
        if "name" in configmap:  # but the run keeps its name: `@<stage>/<name>` inputs name it
            cfg["name"] = configmap["name"]
    for section, values in SHORTER.get(stage.name, {}).items():
        # Only keys the config still has: a renamed knob makes this run longer, not invalid.
        fields = _model_of(stage.config_cls.model_fields[section].annotation).model_fields
        cfg[section] = {
            **(cfg.get(section) or {}),
            **{k: v for k, v in values.items() if k in fields},
        }
    if runs_dir.startswith(STORAGE_MOUNT + "/"):
        cfg["runs_dir"] = str(storage / runs_dir[len(STORAGE_MOUNT) + 1 :])
    reference = _get(configmap, stage.input_field) if stage.input_field else None
    if isinstance(reference, str) and reference.startswith("@"):
        # `@<stage>/<run name>`: the job resolves it itself, from that run's `.latest` pointer on
        # the shared storage, as it does on the cluster.
        if reference[1:].partition("/")[0] not in OUTPUTS:
            pytest.skip(f"{stage.name} reads {reference}, whose stage was not emulated")
        _set(cfg, stage.input_field, reference)
    elif stage.input_field:
        previous = [OUTPUTS[s] for s in OUTPUTS if s != stage.name]
        if not previous:
            pytest.skip(
                f"{stage.name} needs the output of the stage before it, which was not emulated"
            )
        _set(cfg, stage.input_field, previous[-1])
    return yaml.safe_dump(cfg, sort_keys=False)


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def _set(cfg: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        cfg = cfg.setdefault(part, {})
    cfg[leaf] = value


@pytest.fixture(scope="module")
def pod_files(tmp_path_factory):
    """The image's working directory and the PVC, shared by the RayJobs of this module."""
    root = tmp_path_factory.mktemp("emulated-pods")
    workdir, pvc = root / "workdir", root / "pvc"
    (workdir / "job-configs").mkdir(parents=True)
    pvc.mkdir()
    (workdir / "jobs").symlink_to(REPO / "jobs")
    return workdir, pvc


@pytest.fixture(scope="module")
def emulated_clusters(pod_files):
    """Emulated clusters by shape (worker nodes): RayJobs whose rayClusterSpecs have the same
    shape share one, which saves a cluster start per RayJob; each stops at the end."""
    from lmforge.cluster.local import ensure_token

    ensure_token()  # the cluster's token (tests/conftest.py points RAY_AUTH_TOKEN_PATH at a temp file)
    clusters: dict[int, EmulatedRayCluster] = {}

    def get(workers: int) -> EmulatedRayCluster:
        if workers not in clusters:
            clusters[workers] = EmulatedRayCluster(pod_files[0], workers)
            clusters[workers].start()
        return clusters[workers]

    yield get
    for cluster in clusters.values():
        cluster.stop()


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
@pytest.mark.parametrize("path", RAYJOBS, ids=[p.stem for p in RAYJOBS])
def test_rayjob_runs_as_kuberay_would_run_it(path, pod_files, emulated_clusters):
    from ray.job_submission import JobStatus, JobSubmissionClient

    docs = manifest_docs(path)
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    script, config, text, _ = rayjob_entrypoint_config(docs, job)
    if not (REPO / script).exists():
        pytest.skip(f"{script} does not exist yet (its stage is being written)")
    stage = stage_for_job(script)
    if stage is None:
        pytest.skip(f"no registered stage has {script} as its job yet")
    cluster_spec = job["spec"]["rayClusterSpec"]
    groups = [g for g in cluster_spec.get("workerGroupSpecs") or [] if g.get("replicas", 1) > 0]
    wants_gpus = any(
        "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        for g in groups
    )
    job_name = Path(script).stem
    if wants_gpus and not (REPO / "jobs" / "configs" / f"{job_name}-tiny.yaml").exists():
        pytest.skip(
            f"the RayJob asks for GPUs; add jobs/configs/{job_name}-tiny.yaml (a CPU-sized config) to emulate it"
        )
    assert cluster_spec["authOptions"]["mode"] == "token"

    workdir, pvc = pod_files
    (workdir / config).write_text(_pod_config(text, job_name, pvc, stage))
    cluster = emulated_clusters(len(groups))
    client = JobSubmissionClient(cluster.dashboard_url)
    submission_id = client.submit_job(
        entrypoint=job["spec"]["entrypoint"],
        runtime_env=yaml.safe_load(job["spec"]["runtimeEnvYAML"]),
        submission_id=f"{job['metadata']['name']}-emulated",
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (status := client.get_job_status(submission_id)).is_terminal():
        assert time.monotonic() < deadline, f"{submission_id} still {status} after {JOB_TIMEOUT_S}s"
        time.sleep(1)
    logs = client.get_job_logs(submission_id)
    message = client.get_job_info(submission_id).message
    assert status == JobStatus.SUCCEEDED, f"{submission_id} {status}: {message}\n{logs[-4000:]}"

    runs = pvc / "runs" / stage.name
    outputs = sorted(str(p.parent) for p in runs.glob("*/_SUCCESS"))
    assert len(outputs) == 1, (
        f"expected one complete {stage.name} output under {runs}, found {outputs}"
    )
    OUTPUTS[stage.name] = outputs[0]
    if stage.name == "check":
        report = json.loads(Path(outputs[0], "report.json").read_text())
        assert report["nodes_alive"] == 1 + len(groups)  # the head and each worker group's pod
        assert report["storage"] == "ok" and report["problems"] == []
        assert f"[check] {1 + len(groups)} node(s)" in logs
    resolved = yaml.safe_load(Path(outputs[0], "resolved_config.yaml").read_text())
    if stage.name == "eval":  # `model: "@train/base"` resolved to the emulated training run
        assert resolved["model"] == OUTPUTS["train"]
        report = json.loads(Path(outputs[0], "report.json").read_text())
        assert {"val", "stdlib-module-mc", "bias-pairs"} <= set(report["tasks"])
        assert report["tasks"]["stdlib-module-mc"]["acc"]["n"] == 3  # limit: 3 (eval-tiny)
    if stage.name == "train":  # `data.path: "@data/corpus"` resolved to the emulated data run
        assert resolved["data"]["path"] == OUTPUTS["data"]
    if stage.name == "finetune":
        _check_finetune(outputs[0], resolved, logs)


def _check_finetune(output: str, resolved: dict, logs: str) -> None:
    """`base: "@train/base"` resolved to the emulated training run; the fine-tuned model is
    complete and is what `@finetune/<name>` (evaluate's model, serving's artifact) names."""
    from lmforge.model.artifact import resolve_artifact
    from lmforge.stage import read_run_reference

    assert resolved["base"] == OUTPUTS["train"]
    tiny = yaml.safe_load((REPO / "jobs" / "configs" / "finetune-tiny.yaml").read_text())
    steps = [json.loads(line) for line in Path(output, "metrics.jsonl").read_text().splitlines()]
    # step 0 scores the base model (eval_at_start), the last step is the tiny config's max_steps
    assert steps[0]["step"] == 0 and "val_loss" in steps[0]
    assert max(r["step"] for r in steps) == tiny["train"]["max_steps"]
    model = Path(output, "model")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in model.iterdir()
    }
    runs_dir = str(Path(output).parent.parent)
    reference = f"@finetune/{resolved['name']}"
    assert read_run_reference(runs_dir, reference, where="model") == output
    assert resolve_artifact(f"{runs_dir}/{reference}") == str(model)
    assert "[finetune] done in" in logs


# The RayService (manifests/rayservice.yaml)


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
def test_rayservice_runs_as_kuberay_would_run_it(tmp_path, emulated_clusters):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeDeploySchema

    from tests.serve.conftest import make_artifact  # the tiny model of the serve tests

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
    if "train" in OUTPUTS:  # the model the emulated pretrain RayJob trained: the whole chain
        run_dir.parent.mkdir(parents=True)
        run_dir.symlink_to(OUTPUTS["train"])
    else:  # a tiny random-init model in a training run dir, as `lmforge train` leaves one
        make_artifact(run_dir / "model")
    model["artifact"] = str(run_dir)
    log = args.get("request_log") or {}
    if log.get("path"):  # the request log (requestLog.path) is on the PVC too
        assert log["path"].startswith(STORAGE_MOUNT + "/")
        log["path"] = str(pvc / log["path"][len(STORAGE_MOUNT) + 1 :])
    keys = tmp_path / "api-keys"
    keys.write_text(KEY + "\n")
    args["api_key_file"] = str(keys)
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)

    # One machine: one proxy (EveryNode would have every node bind the same port here).
    config["proxy_location"] = "HeadOnly"
    groups = [g for g in cluster.get("workerGroupSpecs") or [] if g.get("replicas", 1) > 0]
    ray_cluster = emulated_clusters(len(groups))  # the stages' cluster when it has this shape
    client = ServeSubmissionClient(ray_cluster.dashboard_url)
    try:
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
        client.delete_applications()
