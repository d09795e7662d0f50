"""Pipeline parallelism (train/pipeline.py) on 2 gloo CPU ranks against 1 process: the same
loss curve and val loss with 1F1B and interleaved 1F1B, checkpoints that resume across layouts,
the same exported artifact. A debug-size model (4 layers, untied head) in fp32, 8 steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge import LmforgeError
from lmforge.model.artifact import load_model
from lmforge.train.config import TrainConfig
from lmforge.train.loop import run_local
from tests.numerics import assert_same_math, loss_curve_tolerance, model_terms
from tests.train.conftest import tiny_train_config
from tests.train.gloo import run_ranks

# A pp run (slow) takes ~10 s alone and minutes on the shared 2-core test machine: timeout(900).

MODEL = {"preset": "debug", "n_layers": 4, "tie_embeddings": False}
SEQ_LEN = 64


def config(data, runs, schedule: str | None, workers: int = 2, **train) -> TrainConfig:
    """global_batch_tokens 512 = 4 micro-batches of 2 rows: the schedule's 4 micro-batches
    (2 per pipeline with 4 workers: 2 pipelines, FSDP2 over each stage's pair of workers)."""
    workers = 1 if schedule is None else workers
    parallel = {"fsdp": False} if schedule is None else {"pp": 2, "pp_schedule": schedule}
    cfg = tiny_train_config(
        data, runs, model=MODEL, parallel=parallel, resources={"num_workers": workers},
        train=train,
    )  # fmt: skip
    return TrainConfig.model_validate(cfg)


def pp_worker(rank: int, cfg: dict, out: str, world: int) -> dict:
    from lmforge.train.loop import train_loop
    from lmforge.train.run import WorkerEnv

    spec = TrainConfig.model_validate(cfg).loop_spec(out, workers=world)
    return train_loop(spec, WorkerEnv(rank, world, torch.device("cpu"), in_ray=False))


def run_pp(cfg: TrainConfig, out: Path) -> None:
    world = cfg.resources.num_workers
    run_ranks(pp_worker, world, cfg.model_dump(mode="json"), str(out), world, timeout=600)


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def series(out: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics(out) if key in m}


def arch(one: Path):
    return load_model(str(one / "model")).cfg


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model(str(out / "model")).state_dict()


def without_last_checkpoint(src: Path, dst: Path) -> None:
    """dst/checkpoints: src's, the newest (step 8) left out, so a run there resumes at step 4."""
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    newest = sorted((dst / "checkpoints").iterdir())[-1]
    assert newest.name.endswith("8"), newest
    shutil.rmtree(newest)


@pytest.fixture(scope="module")
def runs(packed_data, tmp_path_factory):
    """runs(name) -> the run folder of "one" (1 process) or a pp=2 schedule, trained once, when
    a test first asks (each run is within that test's timeout)."""
    root = tmp_path_factory.mktemp("pp")

    def get(name: str) -> Path:
        out = root / name
        if not out.exists():
            if name == "one":
                run_local(config(packed_data, root, None), str(out))
            elif name == "fsdp_x_1f1b":
                run_pp(config(packed_data, root, "1f1b", workers=4), out)
            else:
                run_pp(config(packed_data, root, name), out)
        return out

    return get


def assert_same_curve(got: dict[int, float], want: dict[int, float], arch, key: str) -> None:
    """fp32, the same micro-batches summed in another order (the schedule accumulates each
    stage's gradients and scales them once): tests/numerics.loss_curve_tolerance."""
    assert sorted(got) == sorted(want), key
    for step, value in want.items():
        tol = loss_curve_tolerance(arch, SEQ_LEN, value, step)
        assert got[step] == pytest.approx(value, abs=tol), (key, step)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "fsdp_x_1f1b"])
def test_two_pipeline_stages_match_one_process(runs, schedule):
    one, pp = runs("one"), runs(schedule)
    for key in ("loss", "val_loss", "grad_norm"):
        assert_same_curve(series(pp, key), series(one, key), arch(one), key)
    assert sorted(series(pp, "loss")) == list(range(1, 9))
    assert sorted(series(pp, "val_loss")) == [4, 8]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_artifact_is_the_full_model_of_one_process(runs):
    """The export gathers both stages: every key of the one-process artifact, the same shapes,
    the same values up to 8 fp32 steps of rounding (loss_curve_tolerance at the weights'
    magnitude: ~1e-3, below one Adam step's move of ~lr = 3e-3 that a wrong gradient makes);
    and exactly the weights of its own last checkpoint loaded into one plain process."""
    one = weights(runs("one"))
    for schedule in ("1f1b", "interleaved_1f1b", "fsdp_x_1f1b"):
        got = weights(runs(schedule))
        assert sorted(got) == sorted(one)
        for key, want in one.items():
            tol = loss_curve_tolerance(arch(runs("one")), SEQ_LEN, want.abs().max().item(), 8)
            torch.testing.assert_close(got[key], want, rtol=0, atol=tol, msg=key)
        restored = checkpoint_weights(runs(schedule), arch(runs("one")))
        assert sorted(restored) == sorted(got)
        for key, value in restored.items():
            assert torch.equal(value, got[key]), key


def checkpoint_weights(out: Path, cfg) -> dict[str, torch.Tensor]:
    """The newest checkpoint under `out`, restored into a plain one-process model."""
    from lmforge.train.checkpoint import Checkpointer
    from lmforge.train.optim import build_optimizer
    from lmforge.train.parallelize import build_model

    model = build_model(cfg, torch.device("cpu"), seed=1, fsdp=False)
    optimizer = build_optimizer(config(out, out, None).optim, model, torch.device("cpu"))
    state = Checkpointer(str(out / "checkpoints"), 2, 0, 1, False).restore(model, optimizer)
    assert state is not None and state["step"] == 8 and state["world_size"] > 1
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_pipeline_checkpoint_resumes_in_one_process(runs, packed_data, tmp_path):
    """pp=2's step-4 checkpoint, resumed by one process, trains steps 5..8 as the one-process
    run did, and ends at its artifact."""
    out = tmp_path / "resumed"
    without_last_checkpoint(runs("1f1b"), out)
    run_local(config(packed_data, tmp_path, None), str(out))
    want = {s: v for s, v in series(runs("one"), "loss").items() if s > 4}
    assert_same_curve(series(out, "loss"), want, arch(runs("one")), "loss")
    assert metrics(out)[0]["step"] == 5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_one_process_checkpoint_resumes_at_two_stages(runs, packed_data, tmp_path):
    out = tmp_path / "resumed"
    without_last_checkpoint(runs("one"), out)
    run_pp(config(packed_data, tmp_path, "interleaved_1f1b"), out)
    want = {s: v for s, v in series(runs("one"), "loss").items() if s > 4}
    assert_same_curve(series(out, "loss"), want, arch(runs("one")), "loss")


def pipeline_error(data: Path, out: Path, model: dict, schedule: str, accum: int | None = None):
    """The one-line error build_pipeline raises on rank 0 of 2, before any process group."""
    import dataclasses

    from lmforge.train.data import BatchPlan
    from lmforge.train.layout import parallel_dims
    from lmforge.train.pipeline import build_pipeline, check_pipeline
    from lmforge.train.run import WorkerEnv, setup_run

    cfg = tiny_train_config(
        data, out, model={"preset": "debug", **model}, resources={"num_workers": 2},
        parallel={"pp": 2, "pp_schedule": schedule},
    )  # fmt: skip
    spec = TrainConfig.model_validate(cfg).loop_spec(str(out), workers=2)
    env = WorkerEnv(0, 2, torch.device("cpu"), in_ray=False)
    with pytest.raises(LmforgeError) as e:  # setup_run checks the layout against the model too
        run = setup_run(spec, env)
        if accum is None:
            build_pipeline(run, env)
        else:  # fewer micro-batches than a 2-worker data-parallel split would give
            plan = BatchPlan(SEQ_LEN, 2, 1, accum)
            check_pipeline(dataclasses.replace(run, plan=plan), parallel_dims(spec.parallel, 2))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_layout_the_pipeline_cannot_take_is_one_line(packed_data, tmp_path):
    untied = {"tie_embeddings": False}
    error = pipeline_error(packed_data, tmp_path, {"n_layers": 6, **untied}, "interleaved_1f1b")
    assert "model.n_layers=6 does not divide by pipeline stages=4" in error
    error = pipeline_error(packed_data, tmp_path, {"n_layers": 4}, "1f1b")
    assert "model.tie_embeddings=false" in error
    error = pipeline_error(packed_data, tmp_path, {"n_layers": 4, **untied}, "1f1b", accum=1)
    assert "has 1 micro-batches" in error and "at least parallel.pp=2" in error
    error = pipeline_error(packed_data, tmp_path, {"n_layers": 4, **untied}, "interleaved_1f1b", 3)
    assert "a multiple of parallel.pp=2" in error


def test_stages_in_order_are_the_model_and_their_states_partition_it():
    """float64, so the chain of 4 stages must equal the whole model's forward to ~1e-12; the
    stages' state dicts hold the model's keys (original names), each once."""
    from lmforge.model.llama import Llama, LlamaConfig
    from lmforge.train.pipeline import rank_stages, split_model, stage_layers

    cfg = LlamaConfig(
        vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32,
        tie_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llama(cfg).double()
    parts = [split_model(model, stage_layers(4, s, 4), s == 0, s == 3) for s in range(4)]
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    x = tokens
    for part in parts:
        x = part(x)
    assert_same_math(x, model(tokens), torch.float64, **model_terms(cfg, 16))
    keys = [k for part in parts for k in part.state_dict()]
    assert sorted(keys) == sorted(model.state_dict())
    assert list(parts[1].state_dict())[0] == "layers.1.attn_norm.weight"
    assert rank_stages(1, 2, 2) == [1, 3]  # interleaved: loop-style, worker 1 of 2
