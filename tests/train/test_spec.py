"""The training loop's contract: the driver builds one LoopSpec, every worker gets exactly it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from lmforge import LmforgeError
from lmforge.train import loop
from lmforge.train.config import (
    LoopConfig,
    LoopSpec,
    ParallelConfig,
    TrainConfig,
    check_parallel_layout,
)
from lmforge.train.run import WorkerEnv, setup_run
from tests.train.conftest import tiny_train_config

ONE_WORKER = "parallel.fsdp=false trains on one worker only: set resources.num_workers=1"
TRAIN_PACKAGE = Path(__file__).parents[2] / "platform" / "lmforge" / "train"


def config(data, runs, **sections) -> TrainConfig:
    return TrainConfig.model_validate(tiny_train_config(data, runs, **sections))


@pytest.mark.parametrize(
    ("fsdp", "workers", "ok"),
    [(False, 2, False), (False, 8, False), (False, 1, True), (True, 4, True)],
)
def test_one_parallel_layout_check(fsdp, workers, ok):
    parallel = ParallelConfig(fsdp=fsdp)
    if ok:
        check_parallel_layout(parallel, workers)
        return
    with pytest.raises(LmforgeError) as e:
        check_parallel_layout(parallel, workers)
    assert str(e.value) == ONE_WORKER


def test_a_spec_with_a_bad_layout_is_refused_with_the_same_line(packed_data, tmp_path):
    from lmforge.train.stage import validate_inputs

    cfg = config(packed_data, tmp_path, parallel={"fsdp": False}, resources={"num_workers": 2})
    with pytest.raises(LmforgeError) as stage_error:
        validate_inputs(cfg)  # the train stage, before Ray starts
    with pytest.raises(LmforgeError) as spec_error:
        cfg.loop_spec(str(tmp_path / "out"))  # what a worker validates again
    assert str(stage_error.value) == str(spec_error.value) == ONE_WORKER
    # One process is one worker: run_local's spec is for 1, whatever resources say.
    assert cfg.loop_spec(str(tmp_path / "out"), workers=1).workers == 1


def test_a_spec_has_exactly_one_architecture_source(packed_data, tmp_path):
    spec = config(packed_data, tmp_path).loop_spec(str(tmp_path / "out"))
    fields = spec.model_dump()
    with pytest.raises(ValueError, match="exactly one of model"):
        LoopSpec.model_validate({**fields, "base": "/some/artifact"})
    with pytest.raises(ValueError, match="exactly one of model"):
        LoopSpec.model_validate({**fields, "model": None})


def test_the_worker_runs_the_spec_the_driver_built(packed_data, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from lmforge.train.stage import build_trainer, worker_spec

    cfg = config(packed_data, tmp_path, train={"max_steps": 3, "seed": 7})
    spec = worker_spec(cfg, str(tmp_path / "out"), str(packed_data))
    trainer = build_trainer(spec, cfg.resources)
    got = []
    monkeypatch.setattr(
        WorkerEnv, "from_ray", classmethod(lambda cls: WorkerEnv(0, 2, torch.device("cpu"), True))
    )
    monkeypatch.setattr(loop, "train_loop", lambda s, env: got.append(s) or {"steps": 3})
    # Ray hands each worker the trainer's config after a serialisation round trip.
    loop.ray_train_worker(json.loads(json.dumps(trainer.train_loop_config)))
    assert got == [spec]
    assert got[0].train.seed == 7 and got[0].data_dir == str(packed_data)
    assert got[0].loss == "next_token" and got[0].workers == 2 and got[0].hardware
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary == {"steps": 3}


def test_a_worker_count_other_than_the_specs_is_refused(packed_data, tmp_path):
    spec = config(packed_data, tmp_path).loop_spec(str(tmp_path / "out"), workers=2)
    with pytest.raises(LmforgeError, match="spec is for 2 worker.s. but 1 are running"):
        setup_run(spec, WorkerEnv(0, 1, torch.device("cpu"), in_ray=False))


def test_a_masked_loss_on_plain_token_shards_is_one_clear_error(packed_data, tmp_path):
    spec = config(packed_data, tmp_path).loop_spec(str(tmp_path / "out"), workers=1)
    masked = spec.model_copy(update={"loss": "masked"})
    with pytest.raises(LmforgeError) as e:
        setup_run(masked, WorkerEnv(0, 1, torch.device("cpu"), in_ray=False))
    assert "plain token shards, but this run's loss is masked" in str(e.value)
    assert setup_run(spec, WorkerEnv(0, 1, torch.device("cpu"), in_ray=False)).masked is False


def test_the_spec_sections_are_the_pretraining_classes(packed_data, tmp_path):
    spec = config(packed_data, tmp_path).loop_spec(str(tmp_path / "out"))
    assert type(spec.train) is LoopConfig
    assert LoopSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_train_reads_no_config_by_getattr_and_imports_no_finetune():
    """The loop's inputs are typed: no duck typing of two config classes."""
    for path in sorted(TRAIN_PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
            ):
                target = ast.unparse(node.args[0])
                assert not any(word in target for word in ("cfg", "config", "spec")), (
                    f"{path.name}:{node.lineno} reads a config by getattr({target}, ...)"
                )
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for name in names:
                    assert not name.startswith("lmforge.finetune"), f"{path.name} imports {name}"


def test_loop_module_stays_small_and_has_no_packed_lines():
    text = (TRAIN_PACKAGE / "loop.py").read_text()
    assert len(text.splitlines()) < 450
    assert "fmt: skip" not in text


def test_the_loop_runs_without_ray_imported():
    """`run_local` and GPU benchmarks train in one process where Ray may not be installed."""
    import subprocess
    import sys

    code = (
        "import sys, lmforge.train.loop, lmforge.train.metrics, lmforge.train.export\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
