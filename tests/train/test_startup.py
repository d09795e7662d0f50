"""The start and end of a training run: the phases rank 0 records in timings.jsonl, and the
last step's checkpoint, written only when `checkpoint.at_end` asks for it (the artifact is
written from the same state)."""

from __future__ import annotations

import json

from lmforge.train.checkpoint import complete_checkpoints
from lmforge.train.loop import run_local
from tests.train.test_loop import local_config

RANK0_PHASES = ["data", "model", "first_step", "last_step", "final_checkpoint", "artifact"]


def phases(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "timings.jsonl").read_text().splitlines()]


def test_rank_0_records_its_phases_in_order_with_times_that_never_go_back(packed_data, tmp_path):
    out = tmp_path / "run"
    run_local(local_config(packed_data, tmp_path, train={"max_steps": 3}), str(out))
    rows = phases(out)
    assert [r["phase"] for r in rows] == RANK0_PHASES
    assert {r["who"] for r in rows} == {"rank0"}
    times = [r["t"] for r in rows]
    assert times == sorted(times)


def test_by_default_the_last_step_is_not_checkpointed_but_the_artifact_is_written(
    packed_data, tmp_path
):
    out = tmp_path / "run"
    cfg = local_config(packed_data, tmp_path, train={"max_steps": 6, "eval_every": 0})
    assert cfg.checkpoint.every_steps == 4 and not cfg.checkpoint.at_end
    summary = run_local(cfg, str(out))
    assert summary["steps"] == 6
    assert [s for s, _ in complete_checkpoints(str(out / "checkpoints"))] == [4]
    assert (out / "model" / "model.safetensors").exists()


def test_checkpoint_at_end_writes_the_last_step_too(packed_data, tmp_path):
    out = tmp_path / "run"
    cfg = local_config(
        packed_data, tmp_path, train={"max_steps": 6, "eval_every": 0}, checkpoint={"at_end": True}
    )
    run_local(cfg, str(out))
    assert [s for s, _ in complete_checkpoints(str(out / "checkpoints"))] == [4, 6]
    assert (out / "model" / "model.safetensors").exists()
