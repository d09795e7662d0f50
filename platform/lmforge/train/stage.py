"""The `train` stage: validate, then run the per-worker loop on Ray Train's TorchTrainer.

The driver builds the loop's `LoopSpec` (train/config.py; the finetune stage builds its own and
runs it here too). Ray Train runs `ray_train_worker` on `resources.num_workers` workers (gloo
process group on CPU, NCCL on GPUs), keeps Ray's run directory at `<run>/checkpoints` (so the
checkpoints and Ray's own record of them live with the run), restarts the worker group from the
newest checkpoint up to `resources.max_failures` times, and keeps the last
`checkpoint.keep_last`.
"""

from __future__ import annotations

import math
import os
import traceback
from typing import Any

from lmforge import LmforgeError, StageFailed, storage
from lmforge.stage import Stage, StageContext, record_phase
from lmforge.train.config import (
    LoopConfig,
    LoopSpec,
    ResourcesConfig,
    SpecSource,
    TrainConfig,
    check_parallel_layout,
    scaffold,
)
from lmforge.train.data import PackedShards, batch_plan, read_manifest
from lmforge.train.layout import check_tensor_parallel_use


def validate_inputs(cfg: TrainConfig) -> dict[str, Any]:
    """Everything that can be checked before Ray starts: data, shapes, batch split
    (`Stage.validate`: run_stage calls it before creating the run folder)."""
    manifest = read_manifest(cfg.data.path or "")
    train = PackedShards(storage.join(cfg.data.path, "train"))
    workers = cfg.resources.num_workers
    vocab = int(manifest.get("vocab_size") or 0) or None
    arch = cfg.model.to_llama(vocab_size=vocab, seq_len=train.seq_len)
    check_parallel_layout(cfg.parallel, workers, arch, train.seq_len)
    check_tensor_parallel_use(cfg.parallel, False, bool(cfg.train.eval_tasks))
    check_in_process(cfg.resources)
    data_parallel = workers // cfg.parallel.model_parallel
    batch_plan(
        cfg.train.global_batch_tokens, cfg.train.micro_batch_size, data_parallel, train.seq_len
    )
    return manifest


def check_in_process(resources: ResourcesConfig) -> None:
    """`resources.in_process` with a GPU needs one here (`Stage.validate`: before the run)."""
    if resources.in_process and resources.gpus_per_worker:
        import torch

        if not torch.cuda.is_available():
            raise LmforgeError(
                "resources.in_process=true with gpus_per_worker=1 trains on this machine's GPU, "
                "and it has none: set resources.gpus_per_worker=0, or in_process=false"
            )


def worker_slots(resources: ResourcesConfig, nodes: list[dict[str, Any]]) -> list[int]:
    """How many workers fit on each alive node, by its total CPUs, GPUs and accelerator type."""
    slots = []
    for node in nodes:
        have = node.get("Resources", {})
        if resources.accelerator_type and not have.get(
            f"accelerator_type:{resources.accelerator_type}"
        ):
            slots.append(0)
            continue
        fits = math.floor(have.get("CPU", 0) / resources.cpus_per_worker + 1e-9)
        if resources.gpus_per_worker:
            fits = min(fits, math.floor(have.get("GPU", 0) / resources.gpus_per_worker + 1e-9))
        slots.append(fits)
    return slots


def validate_resources(resources: ResourcesConfig, nodes: list[dict[str, Any]]) -> None:
    """Refuse, in one line, a worker group that this cluster can never place (instead of a hang)."""
    alive = [n for n in nodes if n.get("Alive", True)]
    slots = worker_slots(resources, alive)
    n = resources.num_workers
    fits = {
        "PACK": sum(slots) >= n,
        "SPREAD": sum(slots) >= n,
        "STRICT_PACK": max(slots, default=0) >= n,
        "STRICT_SPREAD": sum(1 for s in slots if s >= 1) >= n,
    }[resources.placement_strategy]
    if fits:
        return
    cpus = sum(nd.get("Resources", {}).get("CPU", 0) for nd in alive)
    gpus = sum(nd.get("Resources", {}).get("GPU", 0) for nd in alive)
    want = f"{n} worker(s) x ({resources.cpus_per_worker:g} CPU"
    want += f", {resources.gpus_per_worker:g} GPU" if resources.gpus_per_worker else ""
    want += f"{', ' + resources.accelerator_type if resources.accelerator_type else ''})"
    raise LmforgeError(
        f"resources: {want} with placement {resources.placement_strategy} do not fit this cluster "
        f"({len(alive)} node(s), {cpus:g} CPU, {gpus:g} GPU in total; at most {sum(slots)} such "
        "worker(s)): lower resources.num_workers / cpus_per_worker / gpus_per_worker, or add nodes"
    )


def decide_hardware(loop: LoopConfig, resources: ResourcesConfig) -> dict[str, Any] | None:
    """Precision and CPU peak, decided here before any worker starts: one quiet probe per node
    (cached), and every rank gets the same answer. GPU workers decide alone (bf16 on GPU, the
    peak by GPU name), since this driver may have no GPU."""
    import torch

    from lmforge.train.hardware import decide

    if resources.gpus_per_worker:
        return None
    return decide(loop, torch.device("cpu"), resources.threads_per_worker).as_dict()


def worker_spec(cfg: SpecSource, output: str, data_dir: str) -> LoopSpec:
    """The loop's contract as the Ray workers get it: absolute paths, since workers do not run
    in the driver's working directory, and the driver's hardware decision."""
    hardware = decide_hardware(cfg.train, cfg.resources)
    return cfg.loop_spec(storage.absolute(output), storage.absolute(data_dir), hardware=hardware)


def build_trainer(spec: LoopSpec, resources: ResourcesConfig):
    """Ray Train's TorchTrainer running `spec` on `resources`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lmforge.train.loop import ray_train_worker

    # Ray Train's controller looks at its workers every 2 s by default, so a run whose workers
    # have finished waited ~1 s (up to 2) more to end; a poll is one small actor call per
    # worker, and a missed one is not a failure (only 10 min of them are). Ray Train passes
    # the variable on to its controller; one set by the user wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    res = resources
    return TorchTrainer(
        ray_train_worker,
        train_loop_config=spec.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if res.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": res.cpus_per_worker,
                **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {}),
            },
            placement_strategy=res.placement_strategy,
            accelerator_type=res.accelerator_type,
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=spec.output,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep_last),
        ),
    )


def run(cfg: TrainConfig, ctx: StageContext) -> dict[str, Any]:
    # inputs: validate_inputs, before Ray
    return train_workers(worker_spec(cfg, ctx.output, cfg.data.path or ""), cfg.resources)


def train_workers(spec: LoopSpec, resources: ResourcesConfig) -> dict[str, Any]:
    """Run `spec` on Ray Train's workers, or in this process (`resources.in_process`); the
    summary, or one line naming the worker's error and how to resume."""
    if resources.in_process:
        from lmforge.train.loop import in_process_worker

        record_phase(spec.output, "trainer")  # check_in_process: the stage's validate
        threads, gpu = resources.threads_per_worker, bool(resources.gpus_per_worker)
        run = lambda: in_process_worker(spec, threads, gpu)  # noqa: E731
        where = "traceback above"
    else:
        import ray

        validate_resources(resources, ray.nodes())
        trainer = build_trainer(spec, resources)
        record_phase(spec.output, "trainer")
        run, where = trainer.fit, "worker logs: the Ray dashboard"
    try:
        run()
    except LmforgeError:
        raise  # already one line that says what to change
    except Exception as e:  # Ray wraps the worker's error; one line names it
        if resources.in_process:  # what Ray shows of a worker's error: its traceback
            traceback.print_exc()
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise StageFailed(
            f"training failed: {lines[-1] if lines else type(e).__name__} "
            f"({where}; checkpoints so far: {storage.join(spec.output, 'checkpoints')}; "
            "rerun the same command to resume)"
        ) from e
    summary = storage.read_json(storage.join(spec.output, "train_summary.json"))
    summary["model"] = storage.join(spec.output, "model")
    return summary


STAGE = Stage(
    name="train",
    config_cls=TrainConfig,
    run=run,
    help="Pretrain a Llama-style model on the data stage's packed shards with Ray Train and FSDP2: "
    "sharded checkpoints, automatic resume, MFU; the model artifact goes to <run>/model/.",
    input_field="data.path",
    scaffold=scaffold,
    validate=validate_inputs,
    uses_ray=lambda cfg: not cfg.resources.in_process,
)
