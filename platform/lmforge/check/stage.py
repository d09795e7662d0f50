"""The `check` stage: is this Ray cluster and this storage ready for the job I am about to run?

Validate before spending: a training RayJob that discovers after an hour of data preparation
that the GPU group never came up, or that its checkpoint bucket is read-only, wastes the hour.
`lmforge check` (or `lmforge submit check`, or the chart's check RayJob) asks the cluster for
its nodes and resources, runs a task on every node that imports lmforge and torch there, writes
and reads back a probe file in the output storage, and fails with one line naming what is
missing. Its report is `report.json` in the output directory.
"""

from __future__ import annotations

import platform as _platform
from typing import Any

from pydantic import Field

from lmforge import StageFailed, storage
from lmforge.stage import Stage, StageConfig, StageContext


class CheckConfig(StageConfig):
    name: str = Field(
        "check", description="Run name (output goes to <runs_dir>/check/<name>-<hash>)."
    )
    min_nodes: int = Field(
        1, ge=1, description="Fail unless at least this many Ray nodes are alive."
    )
    min_cpus: float = Field(
        1, ge=0, description="Fail unless the cluster offers at least this many CPUs in total."
    )
    min_gpus: float = Field(
        0, ge=0, description="Fail unless the cluster offers at least this many GPUs in total."
    )
    probe_nodes: bool = Field(
        True,
        description="Run a task on every alive node that imports lmforge and torch and reports versions and devices.",
    )
    probe_storage: bool = Field(
        True, description="Write, read back and delete a probe file in the output directory."
    )


def _node_probe() -> dict[str, Any]:
    import torch

    import lmforge

    return {
        "hostname": _platform.node(),
        "python": _platform.python_version(),
        "lmforge": lmforge.__version__,
        "torch": torch.__version__,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def probe_every_node() -> list[dict[str, Any]]:
    """One tiny task pinned to each alive node (soft=False), so a broken node is found, not skipped."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_node_probe)
    refs = {
        n["NodeID"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in ray.nodes()
        if n["Alive"]
    }
    results = []
    for node_id, ref in refs.items():
        try:
            results.append({"node_id": node_id, **ray.get(ref, timeout=120)})
        except Exception as e:  # the point is to report which node cannot run lmforge, and why
            results.append(
                {
                    "node_id": node_id,
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                }
            )
    return results


def run(cfg: CheckConfig, ctx: StageContext) -> dict[str, Any]:
    import ray

    resources = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n["Alive"]]
    report: dict[str, Any] = {
        "nodes_alive": len(alive),
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
        "memory_gib": round(resources.get("memory", 0.0) / 2**30, 2),
    }
    problems = []
    if len(alive) < cfg.min_nodes:
        problems.append(f"need {cfg.min_nodes} node(s), {len(alive)} alive")
    if report["cpus"] < cfg.min_cpus:
        problems.append(f"need {cfg.min_cpus:g} CPU(s), cluster has {report['cpus']:g}")
    if report["gpus"] < cfg.min_gpus:
        problems.append(f"need {cfg.min_gpus:g} GPU(s), cluster has {report['gpus']:g}")
    if cfg.probe_nodes:
        report["node_probes"] = probe_every_node()
        problems += [
            f"node {p['node_id'][:8]}: {p['error']}" for p in report["node_probes"] if "error" in p
        ]
    if cfg.probe_storage:
        probe = storage.join(ctx.output, ".probe")
        try:
            storage.write_text(probe, "lmforge storage probe\n")
            ok = storage.read_text(probe) == "lmforge storage probe\n"
            storage.remove(probe)
            report["storage"] = "ok" if ok else "read back different bytes"
        except OSError as e:
            report["storage"] = f"{type(e).__name__}: {e}"
        if report["storage"] != "ok":
            problems.append(f"storage {ctx.output}: {report['storage']}")
    report["problems"] = problems
    storage.write_json(storage.join(ctx.output, "report.json"), report)
    print(
        f"[check] {report['nodes_alive']} node(s), {report['cpus']:g} CPU, {report['gpus']:g} GPU, "
        f"{report['memory_gib']} GiB; storage {report.get('storage', 'not probed')}",
        flush=True,
    )
    if problems:
        raise StageFailed("cluster check failed: " + "; ".join(problems))
    return {k: report[k] for k in ("nodes_alive", "cpus", "gpus")}


STAGE = Stage(
    name="check",
    config_cls=CheckConfig,
    run=run,
    help="Check a Ray cluster and its storage before spending: nodes, CPUs, GPUs, lmforge/torch on every node, a storage round trip.",
    cacheable=False,
)
