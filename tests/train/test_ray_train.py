"""The train stage on Ray Train: 2 CPU workers with FSDP2 against 1 process, an injected worker
fault with recovery, resharding 2 -> 1, resource validation. Two Ray Train runs are shared by
the tests (each ~30 s on a 2-core machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from lmforge import LmforgeError, storage
from lmforge.model.artifact import load_model
from lmforge.stage import get_stage, run_stage
from lmforge.tracking import flatten, param_text
from lmforge.train.checkpoint import Checkpointer, latest_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loop import run_local
from lmforge.train.optim import build_optimizer
from lmforge.train.parallelize import build_model
from tests.numerics import loss_curve_tolerance
from tests.tracking.readers import mlflow_run
from tests.train.conftest import tiny_train_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Ray reports cost a controller round trip: log every 2 steps, checkpoints at 4 and 8.
RAY_TRAIN = {"log_every": 2}


def metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def curve(out) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


@pytest.fixture(scope="module")
def ray_runs(ray_local, packed_data, tmp_path_factory):
    """An uninterrupted 2-worker run, and one whose last worker crashes at step 6.

    Both with relative paths (runs_dir "runs", data.path relative), as a user types them:
    the workers do not share the driver's working directory."""
    home = tmp_path_factory.mktemp("ray-runs")
    before = os.getcwd()
    os.chdir(home)
    data = os.path.relpath(packed_data, home)
    stage = get_stage("train")
    clean = TrainConfig.model_validate(
        tiny_train_config(data, "runs", train=RAY_TRAIN, checkpoint={"keep_last": 1})
    )
    faulty = TrainConfig.model_validate(
        tiny_train_config(
            data,
            "runs",
            name="faulty",
            train={**RAY_TRAIN, "fault_at_step": 6},
            resources={"num_workers": 2, "max_failures": 1},
        )
    )
    results = {"clean": run_stage(stage, clean, quiet=True)}
    results["faulty"] = run_stage(stage, faulty, quiet=True)
    for result in results.values():
        assert not os.path.isabs(result.output)
        result.output = str(home / result.output)
    yield {**results, "config": clean}
    os.chdir(before)


def test_two_fsdp_workers_match_one_process_of_the_same_global_batch(ray_runs, tmp_path):
    """fp32; FSDP's reduce-scatter sums in another order: tests/numerics.loss_curve_tolerance."""
    ray_out = ray_runs["clean"].output
    single = ray_runs["config"].model_copy(
        update={
            "resources": ray_runs["config"].resources.model_copy(update={"num_workers": 1}),
            "parallel": ray_runs["config"].parallel.model_copy(update={"fsdp": False}),
        }
    )
    run_local(single, str(tmp_path / "single"))
    two, one = curve(Path(ray_out)), curve(tmp_path / "single")
    assert list(two) == [2, 4, 6, 8] and set(two) <= set(one)
    arch = load_model(str(tmp_path / "single" / "model")).cfg
    for step, loss in two.items():
        tol = loss_curve_tolerance(arch, 64, one[step], step)
        assert loss == pytest.approx(one[step], abs=tol), step
    final_val = [m["val_loss"] for m in metrics(tmp_path / "single") if "val_loss" in m][-1]
    tol = loss_curve_tolerance(arch, 64, final_val, max(two))
    assert ray_runs["clean"].summary["val_loss"] == pytest.approx(final_val, abs=tol)
    summary = ray_runs["clean"].summary
    assert summary["steps"] == 8 and summary["tokens"] == 8 * 512
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1


def test_injected_worker_fault_recovers_from_the_last_checkpoint(ray_runs):
    clean, faulty = Path(ray_runs["clean"].output), Path(ray_runs["faulty"].output)
    assert (faulty / "fault_injected_at_6").exists()
    assert ray_runs["faulty"].summary["steps_this_run"] == 4  # the restarted group began at 4
    after = {s: v for s, v in curve(faulty).items() if s > 4}
    assert after == {s: v for s, v in curve(clean).items() if s > 4}  # the same curve, exactly
    assert sorted(curve(faulty)) == [2, 4, 6, 8]  # no duplicate lines from the lost attempt
    assert (faulty / "model" / "model.safetensors").exists()
    # rank 0 drew the curve of the whole run, the lost attempt's steps once
    from lmforge.plots import loss_series, read_metrics

    assert loss_series(read_metrics(str(faulty)))["loss"] == sorted(curve(faulty).items())
    assert (faulty / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_mlflow_run_holds_the_metrics_params_and_artifacts_of_the_faulty_run(ray_runs):
    """The embedded MLflow store under runs_dir, read back with MlflowClient: one run across
    the failed attempt and the resumed one, its metric history equal to metrics.jsonl step by
    step (no step twice), its params the resolved config, its artifacts and model tags."""
    faulty = Path(ray_runs["faulty"].output)
    info = json.loads((faulty / "tracking.json").read_text())
    assert info["backend"] == "mlflow" and info["experiment"] == "train"
    assert info["uri"] == f"sqlite:///{faulty.parents[1] / 'mlflow.db'}"
    got = mlflow_run(info["uri"], info["run_id"])
    assert got["status"] == "FINISHED"
    lines = metrics(faulty)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"):
        want = [(m["step"], m[key]) for m in lines if m.get(key) is not None]
        assert got["metrics"][key] == want, key
    resolved = yaml.safe_load((faulty / "resolved_config.yaml").read_text())
    want_params = {k: param_text(v) for k, v in flatten(resolved).items()}
    assert {k: got["params"][k] for k in want_params} == want_params
    assert got["params"]["config_hash"] == ray_runs["faulty"].output.rsplit("-", 1)[-1]
    assert got["params"]["workers"] == "2" and got["params"]["device"] == "cpu"
    assert got["params"]["ray.nodes"] == "1"
    version = json.loads((faulty / "model" / "version.json").read_text())
    assert got["tags"]["model.version"] == version["version"]
    assert got["tags"]["output"] == ray_runs["faulty"].output
    assert {"resolved_config.yaml", "metrics.jsonl", "model/version.json"} <= got["artifacts"]


def test_the_run_records_its_phases_in_order(ray_runs):
    """timings.jsonl (bench/train_startup.py's breakdown): the driver's and rank 0's phases."""
    rows = [json.loads(ln) for ln in (Path(ray_runs["clean"].output) / "timings.jsonl").open()]
    assert [(r["who"], r["phase"]) for r in rows] == [
        *(("driver", p) for p in ("config", "tracking", "ray", "trainer")),
        *(("rank0", p) for p in ("worker", "data", "model", "first_step", "last_step")),
        *(("rank0", p) for p in ("final_checkpoint", "artifact")),
        *(("driver", p) for p in ("stage_run", "done")),
    ]
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)


def test_checkpoint_of_two_workers_loads_into_one_process(ray_runs):
    """Resharding 2 -> 1: the FSDP2 checkpoint loads into a plain model and optimizer."""
    out = ray_runs["clean"].output
    root = storage.join(out, "checkpoints")
    step, _ = latest_checkpoint(root)
    assert step == 8
    cfg = ray_runs["config"]
    artifact = load_model(storage.join(out, "model"))
    model = build_model(artifact.cfg, torch.device("cpu"), seed=123, fsdp=False)
    optimizer = build_optimizer(cfg.optim, model, torch.device("cpu"))
    state = Checkpointer(root, 2, rank=0, world_size=1, in_ray=False).restore(model, optimizer)
    assert state["step"] == 8 and state["world_size"] == 2 and state["rows"] == 8 * 8
    for name, tensor in artifact.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    adam = optimizer.state[model.layers["0"].attn.wq.weight]
    assert int(adam["step"]) == 8 and adam["exp_avg_sq"].abs().sum() > 0
    # Ray Train pruned to checkpoint.keep_last=1 (step 4 was deleted when step 8 was saved)
    assert [p.name for p in sorted(Path(root).glob("step_*"))] == ["step_00000008"]


def test_rerunning_a_finished_run_is_a_no_op(ray_runs):
    result = run_stage(get_stage("train"), ray_runs["config"], quiet=True)
    assert result.status == "skipped"
    assert os.path.abspath(result.output) == ray_runs["clean"].output


def test_asking_for_more_than_the_cluster_has_fails_before_training(
    ray_local, packed_data, tmp_path
):
    cfg = TrainConfig.model_validate(
        tiny_train_config(packed_data, tmp_path, resources={"num_workers": 4})
    )
    with pytest.raises(LmforgeError, match=r"4 worker\(s\) x \(1 CPU\).*do not fit this cluster"):
        run_stage(get_stage("train"), cfg, quiet=True)
    gpu = TrainConfig.model_validate(
        tiny_train_config(packed_data, tmp_path, resources={"num_workers": 2, "gpus_per_worker": 1})
    )
    with pytest.raises(LmforgeError, match=r"1 GPU.*0 GPU in total"):
        run_stage(get_stage("train"), gpu, quiet=True)
