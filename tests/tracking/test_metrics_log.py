"""train/metrics.py's MetricsLog on rank 0: metrics.jsonl is appended (not rewritten), cut back
to the resumed step, and each line reaches the run's tracker once (steps an earlier attempt
already logged are not logged again)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from lmforge import tracking
from lmforge.train.layout import ParallelDims
from lmforge.train.metrics import MetricsLog
from tests.tracking.readers import mlflow_run


def fake_run(output, dims: ParallelDims | None = None) -> tuple[SimpleNamespace, SimpleNamespace]:
    dims = dims or ParallelDims()
    env = SimpleNamespace(rank=0, in_ray=False, world_size=dims.world, device=torch.device("cpu"))
    run = SimpleNamespace(
        spec=SimpleNamespace(output=str(output)),
        arch=SimpleNamespace(n_layers=2, dim=64),
        dims=dims,
        flops_per_token=1e6,
        plan=SimpleNamespace(micro_batch_size=2, accum_steps=1, global_batch_tokens=512),
        total_steps=8,
        peak_tflops=1.0,
        peak_source="test",
        bf16=False,
        precision_reason="test",
    )
    return env, run


def lines(path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_metrics_jsonl_is_appended_not_rewritten(tmp_path):
    log = MetricsLog(*fake_run(tmp_path / "out"), start_step=0)
    log.write({"step": 1, "loss": 2.0})
    path = tmp_path / "out" / "metrics.jsonl"
    inode = os.stat(path).st_ino
    log.write({"step": 2, "loss": 1.5})
    assert os.stat(path).st_ino == inode  # the same file, grown (a rewrite replaces it)
    assert [(m["step"], m["loss"]) for m in lines(path)] == [(1, 2.0), (2, 1.5)]


def test_a_resume_cuts_the_file_back_and_logs_each_step_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "runs" / "train" / "t-abc"
    out.mkdir(parents=True)
    tracker = tracking.open_run(
        tracking.Settings(), str(tmp_path / "runs"), str(out), "train", "t", False
    )
    # An earlier attempt logged steps 1-6, its last checkpoint is at step 4.
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 7))
    )
    log = MetricsLog(*fake_run(out), start_step=4)
    assert [m["step"] for m in lines(out / "metrics.jsonl")] == [1, 2, 3, 4]
    for step in range(5, 9):
        log.write({"step": step, "loss": 20.0 - step, "mfu": None})
    assert [m["step"] for m in lines(out / "metrics.jsonl")] == list(range(1, 9))
    got = mlflow_run(tracker.info["uri"], tracker.run_id)
    # Steps 5 and 6 are the earlier attempt's to log; this one adds 7 and 8, once each.
    assert got["metrics"]["loss"] == [(7, 13.0), (8, 12.0)]
    assert "mfu" not in got["metrics"]
    assert got["params"]["device"] == "cpu" and got["params"]["precision"] == "fp32"


def test_without_a_tracked_run_nothing_is_tracked(tmp_path):
    log = MetricsLog(*fake_run(tmp_path), start_step=0)
    assert log.tracker.backend == "none"
    log.write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "tracking.json").exists()


def test_the_first_line_counts_the_data_parallel_workers(tmp_path, capsys):
    """4 ranks as tp 2 x dp 2: the step's rows are split over 2 workers, not 4."""
    MetricsLog(*fake_run(tmp_path / "a"), start_step=0)
    assert "; 1 worker(s) x 2 seqs x 1 accum = 512 tokens/step" in capsys.readouterr().out
    MetricsLog(*fake_run(tmp_path / "b", ParallelDims(dp_shard=2, tp=2)), start_step=0)
    out = capsys.readouterr().out
    assert "; 2 data-parallel worker(s) (of 4: tp 2 x pp 1 x cp 1) x 2 seqs x 1 accum" in out
