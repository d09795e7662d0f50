"""A 2-node Ray cluster (ray.cluster_utils.Cluster: two raylets of 1 CPU each): the train stage
places one worker per node (STRICT_SPREAD) and learns the same curve as one process.

It runs in a subprocess, because the test session's embedded Ray (ray_local) owns this one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmforge.model import model_config
from lmforge.train.config import TrainConfig
from lmforge.train.loop import run_local
from tests.conftest import REPO
from tests.numerics import loss_curve_tolerance
from tests.train.conftest import tiny_train_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

CLUSTER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ray.cluster_utils import Cluster
    import ray
    from lmforge.cluster.local import ensure_token
    from lmforge.stage import get_stage, run_stage
    from lmforge.train.config import TrainConfig

    ensure_token()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": CPUS, "include_dashboard": False})
    cluster.add_node(num_cpus=CPUS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    cfg = TrainConfig.model_validate(json.loads(sys.argv[1]))
    result = run_stage(get_stage("train"), cfg, quiet=True)
    print("RESULT " + json.dumps({"nodes": len(nodes), "output": result.output}))
    ray.shutdown()
    cluster.shutdown()
    """
)


def train_on_two_nodes(cfg: dict, cpus_per_node: int) -> Path:
    """The train stage of `cfg` on a 2-node `ray.cluster_utils.Cluster` (head + 1 node, each
    with `cpus_per_node` CPUs), in a subprocess; its output folder."""
    proc = subprocess.run(
        [sys.executable, "-c", CLUSTER_SCRIPT.replace("CPUS", str(cpus_per_node)), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=REPO,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["nodes"] == 2
    return Path(result["output"])


def losses(path: Path) -> dict[int, float]:
    metrics = [json.loads(ln) for ln in path.read_text().splitlines()]
    return {m["step"]: m["loss"] for m in metrics if "loss" in m}


def test_two_node_cluster_trains_one_worker_per_node(packed_data, tmp_path):
    cfg = tiny_train_config(
        packed_data,
        tmp_path / "runs",
        train={"log_every": 4, "eval_every": 0},
        resources={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
    )
    two_nodes = losses(train_on_two_nodes(cfg, cpus_per_node=1) / "metrics.jsonl")
    single = TrainConfig.model_validate(
        tiny_train_config(
            packed_data,
            tmp_path / "single",
            train={"log_every": 4, "eval_every": 0},
            resources={"num_workers": 1},
            parallel={"fsdp": False},
        )
    )
    run_local(single, str(tmp_path / "single-out"))
    reference = losses(tmp_path / "single-out" / "metrics.jsonl")
    assert list(two_nodes) == [4, 8]
    arch = model_config("debug")
    for step, loss in two_nodes.items():
        tol = loss_curve_tolerance(arch, 64, reference[step], step)  # tests/numerics.py
        assert loss == pytest.approx(reference[step], abs=tol)
