"""Helpers for the chart tests: render helm/lmforge, find pod specs, load the KubeRay CRD schemas.

No Kubernetes API server runs here, so the chart is checked statically (helm lint / template,
Kubernetes 1.35 and KubeRay v1.7.0 schemas, a policy over every pod spec) and its RayJobs are
executed against a real local Ray cluster the way KubeRay would run them (test_operator_emulation).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, SHARED, free_port

CHART = REPO / "helm" / "lmforge"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
MANIFESTS = REPO / "manifests"
CRDS = SHARED / "kuberay-crds" / "v1.7.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.k8s)


def helm_path() -> str | None:
    local = Path(sys.prefix) / "bin" / "helm"
    return str(local) if local.exists() else shutil.which("helm")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    path = helm_path()
    if path is None:
        pytest.skip(
            "helm is not installed: run `python scripts/install_k8s_tools.py` (make test does)"
        )
    return subprocess.run([path, *args], capture_output=True, text=True, check=check, timeout=60)


@functools.cache
def _render(values: tuple[str, ...], sets: tuple[str, ...]) -> tuple[dict, ...]:
    args = ["template", "lmforge", str(CHART)]
    for v in values:
        args += ["-f", v]
    for s in sets:
        args += ["--set", s]
    return tuple(d for d in yaml.safe_load_all(helm(*args).stdout) if d)


def render(*values: str | Path, sets: tuple[str, ...] = ()) -> list[dict]:
    """The chart's objects for these values files and --set flags (deep copies: mutate freely)."""
    return copy.deepcopy(list(_render(tuple(str(v) for v in values), tuple(sets))))


def render_error(*sets: str) -> str:
    """stderr of a render that must fail."""
    args = ["template", "lmforge", str(CHART)]
    for s in sets:
        args += ["--set", s]
    result = helm(*args, check=False)
    assert result.returncode != 0, f"rendering with {sets} should fail but succeeded"
    return result.stderr


# Every values set the chart is checked with: the defaults, each ci/ file, and everything on.
ALL_ON = (
    "monitoring.podMonitor.enabled=true",
    "monitoring.grafanaDashboard.enabled=true",
    "monitoring.alerts.enabled=true",
    "improve.enabled=true",
    "stages.prepareData.enabled=true",
    "stages.pretrain.enabled=true",
    "stages.finetune.enabled=true",
    "ray.autoscaling=true",
    "stages.evaluate.enabled=true",
    "serve.enabled=true",
    "serve.apiKeys.secretName=lmforge-api-keys",
    "serve.models.lmforge-chat.artifact=train/base-0123456789ab",
    "tracking.server.enabled=true",
)
VALUE_SETS = [
    pytest.param((), (), id="default"),
    *[pytest.param((str(p),), (), id=p.stem) for p in CI_VALUES],
    pytest.param((), ALL_ON, id="all-on"),
]


def rayjob_specs(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    """(where, RayJobSpec) of every RayJob and of every RayCronJob's jobTemplate (the RayJobs
    it will create)."""
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "RayJob":
            yield where, obj["spec"]
        elif obj["kind"] == "RayCronJob":
            yield f"{where} jobTemplate", obj["spec"]["jobTemplate"]


def ray_cluster_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, RayClusterSpec) of an object that creates a Ray cluster."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    where = f"{kind}/{obj['metadata']['name']}"
    if kind == "RayCronJob":
        spec = spec["jobTemplate"]
    if kind == "RayCluster":
        yield where, spec
    elif kind in ("RayJob", "RayCronJob") and spec.get("rayClusterSpec"):
        yield where, spec["rayClusterSpec"]
    elif kind == "RayService":
        yield where, spec["rayClusterConfig"]


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, PodSpec) of every pod an object creates: Ray head and workers, job submitters, workloads."""
    for where, cluster in ray_cluster_specs(obj):
        yield f"{where} head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs") or []:
            yield f"{where} worker {group['groupName']}", group["template"]["spec"]
    for where, spec in rayjob_specs([obj]):
        if spec.get("submitterPodTemplate"):
            yield f"{where} submitter", spec["submitterPodTemplate"]["spec"]
    spec = obj.get("spec") or {}
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        yield f"{obj['kind']}/{obj['metadata']['name']}", spec["template"]["spec"]
    if obj["kind"] == "Pod":
        yield f"Pod/{obj['metadata']['name']}", spec


@functools.cache
def crd_validator(kind: str):
    """A validator of the v1 openAPIV3Schema of a KubeRay CRD, made strict: unknown fields are errors.

    The API server would silently prune an unknown field (a typo in the chart); here it fails.
    """
    import jsonschema

    return jsonschema.Draft7Validator(_crd_schema(kind))


def _crd_schema(kind: str) -> dict[str, Any]:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (../shared is absent in this checkout)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB of YAML each
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def manifest_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def rayjob_entrypoint_config(docs: list[dict], job: dict) -> tuple[str, str, str, list[str]]:
    """Follow a RayJob's entrypoint to the config file its head pod would read.

    Returns (job script, config path relative to the working directory, the file's text as the
    pod sees it, the --set overrides). The path resolves through the head container's
    workingDir and volumeMounts to a projected ConfigMap item, and the ConfigMap is looked up
    among `docs` (the objects applied together with the RayJob).
    """
    import shlex

    if job["kind"] == "RayCronJob":
        job = {**job, "spec": job["spec"]["jobTemplate"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:1] == ["python"] and argv[2] == "-c", argv
    script, config, rest = argv[1], argv[3], argv[4:]
    overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    full = f"{container['workingDir']}/{config}"
    volumes = {v["name"]: v for v in head["volumes"]}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for mount in container["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not full.startswith(prefix):
            continue
        for source in volumes[mount["name"]]["projected"]["sources"]:
            for item in source["configMap"]["items"]:
                if item["path"] == full[len(prefix) :]:
                    data = configmaps[source["configMap"]["name"]]["data"]
                    return script, config, data[item["key"]], overrides
    raise AssertionError(f"{job['metadata']['name']}: no mounted ConfigMap provides {full}")


def stage_for_job(script: str):
    """The registered lmforge Stage whose RayJob entry point is `script`, or None."""
    from lmforge import ConfigError
    from lmforge.stage import STAGES, get_stage

    for name in STAGES:
        try:
            stage = get_stage(name)
        except ConfigError:
            continue  # a stage being written by someone else that does not import yet
        if stage.job_script == script:
            return stage
    return None


class EmulatedRayCluster:
    """The pods of a rayClusterSpec as local Ray nodes: a head and `workers` worker nodes."""

    def __init__(self, workdir: Path, workers: int):
        self.workdir = workdir
        self.workers = workers
        # Short: Ray's socket paths under the temp dir must stay under ~107 bytes.
        self.root = tempfile.mkdtemp(prefix="lmf-k8s-", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        # `python` in the entrypoint is the image's interpreter, the one with lmforge: here, ours.
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        self.env = dict(os.environ, PATH=path, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus=2", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=100000000", *args]  # fmt: skip
        # cwd: the pod's workingDir, inherited by the raylet and so by the job's driver.
        proc = subprocess.run(
            cmd, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"ray start failed: {proc.stderr[-2000:]}"

    def start(self) -> None:
        self._ray_start("--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                        "--include-dashboard=true", f"--temp-dir={self.root}/head")  # fmt: skip
        for i in range(self.workers):
            self._ray_start(f"--address=127.0.0.1:{self.gcs_port}", f"--temp-dir={self.root}/w{i}")

    def stop(self) -> None:
        """Stop only this cluster's processes: those whose command line names its temp root."""
        import psutil

        mine = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if (
                self.root in " ".join(proc.info.get("cmdline") or [])
                and proc.info["pid"] != os.getpid()
            ):
                mine.append(proc)
        for proc in mine:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(mine, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
