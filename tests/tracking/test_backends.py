"""Every tracking backend through the one interface, read back by an independent reader: a
stage run opened by the runner, a worker's metric stream logged into it, a resumed attempt
continuing the same run, and the status, params, tags and artifacts at the end."""

from __future__ import annotations

import json
import os

import numpy as np

from lmforge import tracking
from lmforge.tracking.mlflow_backend import local_store
from tests.tracking.readers import mlflow_run, tensorboard_events, wandb_run

PARAMS = {"optim.lr": "0.001", "train.max_steps": "6", "name": "tiny"}
# A metric stream as the loop logs it: (step, metrics), an eval line at step 0 first.
STREAM = [(0, {"val_loss": 5.5})] + [
    (s, {"loss": 6.0 / s, "lr": 1e-3 * s / 6, "grad_norm": 0.5 + s}) for s in range(1, 7)
]


def log_attempts(settings, runs_dir, run_dir) -> tuple[tracking.Tracker, tracking.Tracker]:
    """Two attempts at one run: steps 0-3 and a failure, then a resume that logs 4-6."""
    first = tracking.open_run(settings, runs_dir, run_dir, "train", "tiny", resume=False)
    first.log_params(PARAMS)
    first.close()  # as the stage runner does while its workers run
    worker = tracking.reopen(run_dir)
    for step, metrics in STREAM[:4]:
        worker.log_metrics(metrics, step=step)
    worker.close()  # the worker process ends
    first.finish("FAILED")
    second = tracking.open_run(settings, runs_dir, run_dir, "train", "tiny", resume=True)
    second.log_params(PARAMS | {"name": "changed"})  # a param keeps its first value
    second.close()
    worker = tracking.reopen(run_dir)
    for step, metrics in STREAM[4:]:
        worker.log_metrics(metrics, step=step)
    worker.close()
    report = os.path.join(run_dir, "report.md")
    with open(report, "w") as f:
        f.write("| task | metric |\n")
    second.set_tags({"model.version": "v-0123456789ab"})
    second.log_artifact(report)
    second.log_artifact(report, "plots")
    second.finish("FINISHED")
    return first, second


def expected_history() -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for step, metrics in STREAM:
        for key, value in metrics.items():
            out.setdefault(key, []).append((step, value))
    return out


def test_mlflow_embedded_store_under_runs_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "train" / "tiny-abc"
    run_dir.mkdir(parents=True)
    first, second = log_attempts(tracking.Settings(), str(runs), str(run_dir))
    assert second.run_id == first.run_id  # the resumed attempt continued the same run
    uri, artifacts = local_store(str(runs))
    assert uri == f"sqlite:///{runs}/mlflow.db" and (runs / "mlflow.db").exists()
    got = mlflow_run(uri, first.run_id)
    assert got["metrics"] == expected_history()
    assert got["params"] == PARAMS
    assert got["tags"]["model.version"] == "v-0123456789ab"
    assert got["status"] == "FINISHED"
    assert got["artifacts"] == {"report.md", "plots/report.md"}
    assert got["run"].info.artifact_uri.startswith(f"file://{artifacts}/train/")
    assert got["run"].info.run_name == "train/tiny-abc"
    info = json.loads((run_dir / "tracking.json").read_text())
    assert info["run_id"] == first.run_id and info["uri"] == uri


def test_mlflow_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = tracking.open_run(
        tracking.Settings(experiment="exp"),
        str(tmp_path / "runs"),
        str(run_dir),
        "eval",
        "x",
        False,
    )
    tracker.log_metrics({"acc": 0.5})
    tracker.finish()
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    got = mlflow_run(uri, tracker.run_id)
    assert got["metrics"] == {"acc": [(0, 0.5)]}
    assert got["run"].info.experiment_id == tracker.info["experiment_id"]


def test_mlflow_pipeline_parent_run_nests_its_stage_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings, runs = tracking.Settings(), str(tmp_path / "runs")
    with tracking.parent_run(settings, runs, "my-model", {"pipeline": "my-model"}) as parent:
        child = tracking.open_run(settings, runs, str(tmp_path / "a"), "data", "a", False)
        child.finish()
    got = mlflow_run(parent.info["uri"], child.run_id)
    assert got["tags"]["mlflow.parentRunId"] == parent.run_id
    assert child.info["experiment"] == "my-model"  # the pipeline's experiment
    assert mlflow_run(parent.info["uri"], parent.run_id)["status"] == "FINISHED"


def test_wandb_offline_run_files_read_back(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "runs" / "train" / "tiny-abc"
    run_dir.mkdir(parents=True)
    settings = tracking.Settings(backend="wandb", experiment="exp")
    first, second = log_attempts(settings, str(tmp_path / "runs"), str(run_dir))
    assert second.run_id == first.run_id
    got = wandb_run(str(tmp_path / "runs"), first.run_id)
    assert got["history"] == expected_history()
    # Offline, a resumed attempt cannot read the run's earlier config: the last value wins.
    assert {k: got["config"][k] for k in PARAMS} == PARAMS | {"name": "changed"}
    assert got["summary"]["tag.model.version"] == "v-0123456789ab"
    assert {"report.md", "plots/report.md"} <= got["files"]


def test_tensorboard_event_files_read_back(tmp_path):
    run_dir = tmp_path / "runs" / "train" / "tiny-abc"
    run_dir.mkdir(parents=True)
    settings = tracking.Settings(backend="tensorboard")
    first, _ = log_attempts(settings, str(tmp_path / "runs"), str(run_dir))
    logdir = tmp_path / "runs" / "tensorboard" / "train" / "train" / "tiny-abc"
    assert first.info["logdir"] == str(logdir)
    got = tensorboard_events(str(logdir))
    # Event files store scalars as float32.
    want = {k: [(s, float(np.float32(v))) for s, v in h] for k, h in expected_history().items()}
    assert {k: sorted(v) for k, v in got["scalars"].items()} == want
    assert "| optim.lr | 0.001 |" in got["texts"]["params"][0]
    assert "v-0123456789ab" in got["texts"]["tags"][0]
    assert got["texts"]["status"] == ["FAILED", "FINISHED"]
    assert (logdir / "artifacts" / "plots" / "report.md").exists()


def test_none_backend_writes_nothing(tmp_path):
    tracker = tracking.open_run(
        tracking.Settings(backend="none"), str(tmp_path), str(tmp_path / "r"), "data", "x", False
    )
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.finish()
    assert list(tmp_path.iterdir()) == []
    assert tracking.reopen(str(tmp_path / "r")).backend == "none"


def test_a_runs_dir_on_an_object_store_is_untracked_saying_why(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = tracking.open_run(
        tracking.Settings(), "s3://bucket/runs", "s3://bucket/runs/x", "data", "x", False
    )
    assert tracker.backend == "none"
    err = capsys.readouterr().err
    assert "runs_dir s3://bucket/runs is not a local path" in err and "tracking.uri" in err


def test_a_worker_whose_tracker_fails_keeps_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracking.open_run(tracking.Settings(), str(tmp_path), str(run_dir), "train", "x", False)
    said: list[str] = []
    worker = tracking.reopen(str(run_dir), say=said.append)
    worker.inner.client = None  # any call now raises
    worker.log_metrics({"loss": 1.0}, step=1)
    worker.log_metrics({"loss": 1.0}, step=2)
    assert len(said) == 1 and said[0].startswith("tracking off: mlflow log_metrics failed")


def test_flatten_and_numeric():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a.b": 1,
        "a.c": [1, 2],
        "d": None,
    }
    assert tracking.numeric(
        {"step": 3, "time": 1.0, "loss": 2, "ok": True, "mfu": None, "x": float("nan"), "s": "t"}
    ) == {"loss": 2.0}
    assert [tracking.param_text(v) for v in (None, True, [1, 2], 0.5)] == [
        "null",
        "true",
        "[1, 2]",
        "0.5",
    ]
