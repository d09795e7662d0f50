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

Stages run in pipeline order; a stage with an input (train's data.path) gets the output of the
stage before it, as `lmforge pipeline run` passes it. A RayJob whose job script does not exist
yet, or whose stage is not registered yet, is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.k8s.conftest import MANIFESTS, manifest_docs, rayjob_entrypoint_config, stage_for_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STORAGE_MOUNT = "/mnt/lmforge"  # storage.mountPath of the chart's values used for manifests/
JOB_TIMEOUT_S = 240
# Stage name -> config values that keep a long stage to seconds here (merged over the tiny config).
SHORTER = {
    "train": {
        "train": {"max_steps": 4, "log_every": 1, "eval_every": 2, "eval_sequences": 8},
        "checkpoint": {"every_steps": 2},
    }
}


def _rayjobs_in_pipeline_order() -> list[Path]:
    from lmforge.stage import DEFAULT_PIPELINE

    def order(path: Path) -> int:
        docs = manifest_docs(path)
        job = next(d for d in docs if d["kind"] == "RayJob")
        stage = stage_for_job(rayjob_entrypoint_config(docs, job)[0])
        return (
            DEFAULT_PIPELINE.index(stage.name) if stage and stage.name in DEFAULT_PIPELINE else 99
        )

    return sorted(MANIFESTS.glob("rayjob.*.yaml"), key=order)


RAYJOBS = _rayjobs_in_pipeline_order()
OUTPUTS: dict[str, str] = {}  # stage name -> output directory of its emulated run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmulatedRayCluster:
    """The pods of a rayClusterSpec as local Ray nodes: a head and `workers` worker nodes."""

    def __init__(self, workdir: Path, workers: int):
        self.workdir = workdir
        self.workers = workers
        # Short: Ray's socket paths under the temp dir must stay under ~107 bytes.
        self.root = tempfile.mkdtemp(prefix="lmf-k8s-", dir="/tmp")
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        # `python` in the entrypoint is the image's interpreter, the one with lmforge: here, ours.
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        self.env = dict(os.environ, PATH=path, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus=2", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={_free_port()}", "--object-store-memory=100000000", *args]  # fmt: skip
        # cwd: the pod's workingDir, inherited by the raylet and so by the job's driver.
        proc = subprocess.run(
            cmd, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"ray start failed: {proc.stderr[-2000:]}"

    def start(self) -> None:
        self._ray_start("--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}",
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


def _pod_config(text: str, job: str, storage: Path, stage) -> str:
    """The ConfigMap's config as this emulation's pod sees it (see the module docstring)."""
    from lmforge.config import _model_of

    cfg = yaml.safe_load(text) or {}
    runs_dir = str(cfg.get("runs_dir", ""))
    tiny = REPO / "jobs" / "configs" / f"{job}-tiny.yaml"
    if tiny.exists():  # a whole config of its own, sized for a laptop: it replaces the ConfigMap's
        cfg = yaml.safe_load(tiny.read_text()) or {}
    for section, values in SHORTER.get(stage.name, {}).items():
        # Only keys the config still has: a renamed knob makes this run longer, not invalid.
        fields = _model_of(stage.config_cls.model_fields[section].annotation).model_fields
        cfg[section] = {
            **(cfg.get(section) or {}),
            **{k: v for k, v in values.items() if k in fields},
        }
    if runs_dir.startswith(STORAGE_MOUNT + "/"):
        cfg["runs_dir"] = str(storage / runs_dir[len(STORAGE_MOUNT) + 1 :])
    if stage.input_field:
        previous = [OUTPUTS[s] for s in OUTPUTS if s != stage.name]
        if not previous:
            pytest.skip(
                f"{stage.name} needs the output of the stage before it, which was not emulated"
            )
        node = cfg
        *parents, leaf = stage.input_field.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = previous[-1]
    return yaml.safe_dump(cfg, sort_keys=False)


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
    from lmforge.cluster import ensure_token

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
