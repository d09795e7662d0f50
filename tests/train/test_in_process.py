"""`resources.in_process`: the train stage runs its one worker in the command's process, like
Ray Train's local mode, and starts no Ray. The same loop, so the same curve as `run_local`; its
own checkpoints, so a crash resumes on the rerun; bad combinations are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from lmforge import LmforgeError, StageFailed, tracking
from lmforge.cluster import local
from lmforge.stage import TIMINGS, get_stage, run_stage
from lmforge.train.config import TrainConfig
from lmforge.train.loop import run_local
from tests.tracking.readers import mlflow_run
from tests.train.conftest import tiny_train_config

IN_PROCESS = {"num_workers": 1, "cpus_per_worker": 1, "in_process": True}


def curve(out: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in rows if "loss" in m}


def config(data: Path, runs: Path, **sections) -> TrainConfig:
    sections["resources"] = {**IN_PROCESS, **sections.get("resources", {})}
    return TrainConfig.model_validate(tiny_train_config(data, runs, **sections))


def test_in_process_training_is_run_locals_loop_and_starts_no_ray(
    packed_data, tmp_path, one_torch_thread, monkeypatch
):
    def no_ray(address=None):
        raise AssertionError("in-process training connected to Ray")

    monkeypatch.setattr(local, "connect_in_background", no_ray)
    monkeypatch.setattr(local, "connect", no_ray)
    result = run_stage(get_stage("train"), config(packed_data, tmp_path / "runs"), quiet=True)
    out = Path(result.output)
    run_local(config(packed_data, tmp_path / "ref"), str(tmp_path / "ref-out"))
    # one thread each (cpus_per_worker=1), the same batches and order: the same numbers
    assert curve(out) == curve(tmp_path / "ref-out")
    assert len(curve(out)) == 8 and result.summary["steps"] == 8
    assert (out / "model" / "model.safetensors").exists() and (out / "_SUCCESS").exists()
    rows = [json.loads(ln) for ln in (out / TIMINGS).read_text().splitlines()]
    phases = [row["phase"] for row in rows]
    assert "ray" not in phases  # no Ray was started for it
    assert phases.index("trainer") < phases.index("worker") < phases.index("first_step")
    # The tracked run opened after the first step (not before it), and has every step's loss.
    first_step = next(row["t"] for row in rows if row["phase"] == "first_step")
    assert (out / tracking.TRACKING_FILE).stat().st_mtime >= first_step
    info = json.loads((out / tracking.TRACKING_FILE).read_text())
    tracked = mlflow_run(info["uri"], info["run_id"])
    assert dict(tracked["metrics"]["loss"]) == curve(out) and tracked["status"] == "FINISHED"


def test_a_crash_in_process_is_one_line_and_the_rerun_resumes_from_the_last_checkpoint(
    packed_data, tmp_path, one_torch_thread
):
    stage, runs = get_stage("train"), tmp_path / "runs"
    faulty = config(packed_data, runs, train={"fault_at_step": 6})
    with pytest.raises(StageFailed) as err:
        run_stage(stage, faulty, quiet=True)
    message = str(err.value)
    assert "injected fault" in message and "rerun the same command to resume" in message
    assert "\n" not in message
    resumed = run_stage(stage, faulty, quiet=True)  # the marker makes the fault happen once
    run_local(config(packed_data, tmp_path / "ref"), str(tmp_path / "ref-out"))
    want = curve(tmp_path / "ref-out")
    got = curve(Path(resumed.output))
    # steps 5 and 6 ran twice (before the crash and after resuming from step 4), logged once
    assert sorted(got) == list(range(1, 9)) and got == want


def test_in_process_takes_one_worker_and_a_gpu_only_where_there_is_one(packed_data, tmp_path):
    with pytest.raises(ValidationError, match="in_process=true trains in one process, not 2"):
        config(packed_data, tmp_path, resources={"num_workers": 2})
    on_gpu = config(packed_data, tmp_path, resources={"gpus_per_worker": 1})
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpus_per_worker=1 in process is valid here")
    with pytest.raises(LmforgeError, match="has none: set resources.gpus_per_worker=0"):
        run_stage(get_stage("train"), on_gpu, quiet=True)
    assert not (tmp_path / "train").exists()  # refused before the run folder is made


def test_the_lmforge_command_runs_atexit_handlers_and_flushes_before_its_fast_exit():
    """`console` ends with os._exit (no interpreter teardown), after what a normal exit does."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "sys.argv = ['lmforge', '--version']\n"
        "from lmforge.cli import console\n"
        "print('buffered', end='')\n"
        "console()\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith("bufferedlmforge ") and lines[-1] == "atexit ran"
    assert "not reached" not in done.stdout
