"""Tensor parallelism (train/parallelize.py `apply_tensor_parallel`) on CPU: gloo ranks as GPUs.

The head's logits stay sharded on the vocab and the loss is computed on the shards (loss
parallelism): equal to the full-logits loss and gradients. tp=2 and fsdp x tp (dp_shard=2 x
tp=2) learn the same curve as one process, and so does full fine-tuning (the masked loss) under
tp=2; checkpoints saved under tp=2 resume into fsdp=2 and into one process (and back) with equal
weights; the artifact is the one-process artifact; and on Ray Train (one node, and two nodes
with tp inside a node).

Tolerance (fp32): a tensor-parallel step computes the same sums as one process, split: the
row-wise o and down projections add tp partial sums over D/tp and F/tp terms, the data-parallel
ranks' gradients are added in another order. Each is a reordering of a sum of at most
max(D, F, T) terms, once per block and once for the head, compounded per optimizer step:
tests/numerics.loss_curve_tolerance, the bound the FSDP tests use. (The loss-parallel
log-sum-exp adds tp partial sums over V/tp terms each: one more reordering per step, inside that
bound's compounding.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmforge import LmforgeError
from lmforge.model import model_config
from lmforge.train.config import TrainConfig
from lmforge.train.layout import (
    ParallelConfig,
    check_parallel_layout,
    check_tensor_parallel_use,
    parallel_dims,
)
from lmforge.train.loop import run_local
from lmforge.train.parallelize import loss_context
from tests.numerics import assert_same_math, loss_curve_tolerance, model_terms, tolerance
from tests.train.conftest import tiny_train_config
from tests.train.gloo import run_ranks
from tests.train.test_multinode import train_on_two_nodes

STEPS = 4  # debug preset, 8 rows of 64 tokens a step: seconds per run


def curve(out: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in rows if "loss" in m}


def artifact(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from lmforge.model.artifact import WEIGHTS

    return load_file(str(out / "model" / WEIGHTS))


def config(data, out, workers: int, steps: int = STEPS, resume: bool = False, **parallel):
    return tiny_train_config(
        data,
        out,
        train={"max_steps": steps, "log_every": 1, "eval_every": 2},
        checkpoint={"every_steps": 2, "keep_last": 3, "resume": resume},
        resources={"num_workers": workers},
        parallel={"fsdp": workers > 1, **parallel},
    )


def train_ranks(rank: int, world: int, data: str, out: str, steps: int, resume: bool, par: dict):
    """The real loop on one gloo rank; what the test reads comes from the run folder."""
    from lmforge.train.loop import train_loop
    from lmforge.train.run import WorkerEnv

    cfg = TrainConfig.model_validate(config(data, out, world, steps, resume, **par))
    summary = train_loop(
        cfg.loop_spec(out, workers=world), WorkerEnv(rank, world, torch.device("cpu"), False)
    )
    return {"steps": summary["steps"]}


def train(data, out: Path, world: int, steps: int = STEPS, resume: bool = False, **parallel):
    if world == 1:
        cfg = TrainConfig.model_validate(config(data, out, 1, steps, resume, **parallel))
        run_local(cfg, str(out))
    else:
        run_ranks(train_ranks, world, world, str(data), str(out), steps, resume, parallel)
    return out


@pytest.fixture(scope="module")
def one_process(packed_data, tmp_path_factory) -> Path:
    return train(packed_data, tmp_path_factory.mktemp("tp") / "one", 1)


def assert_same_curve(got: dict[int, float], want: dict[int, float]) -> None:
    assert list(got) == list(want) == list(range(1, STEPS + 1))
    arch = model_config("debug")
    for step, loss in got.items():
        assert loss == pytest.approx(
            want[step], abs=loss_curve_tolerance(arch, 64, want[step], step)
        )


def assert_same_weights(got: dict, want: dict, steps: int = STEPS) -> None:
    """Weights after `steps` Adam steps from gradients that differ by summation order only."""
    assert sorted(got) == sorted(want)
    arch = model_config("debug")
    for name, w in want.items():
        tol = tolerance(
            torch.float32,
            terms=max(arch.dim, arch.ffn_dim, 64),
            magnitude=w.abs().max().item(),
            depth=(arch.n_layers + 1) * steps,
        )
        torch.testing.assert_close(got[name], w, atol=tol, rtol=0, msg=name)


# ---------------------------------------------------------------- layout checks (no processes)


@pytest.mark.parametrize(
    ("parallel", "workers", "message"),
    [
        ({"tp": 3}, 3, "model.n_heads=4 does not divide by parallel.tp=3"),
        ({"tp": 4}, 4, "model.n_kv_heads=2 does not divide by parallel.tp=4"),
        ({"tp": 2}, 3, "resources.num_workers=3 does not divide into parallel.tp=2"),
        ({"tp": 2, "fsdp": False}, 4, "parallel.fsdp=false has no data parallelism"),
    ],
)
def test_a_layout_that_does_not_divide_is_one_line_naming_it(parallel, workers, message):
    with pytest.raises(LmforgeError) as raised:
        check_parallel_layout(ParallelConfig(**parallel), workers, model_config("debug"), 64)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_sequence_parallel_needs_seq_len_to_divide_by_tp():
    with pytest.raises(LmforgeError, match=r"seq_len=63 does not divide by parallel.tp=2"):
        check_parallel_layout(ParallelConfig(tp=2), 2, model_config("debug"), 63)


def test_the_train_stage_checks_the_layout_against_the_model_before_ray_starts(
    packed_data, tmp_path
):
    from lmforge.train.stage import validate_inputs

    cfg = TrainConfig.model_validate(config(packed_data, tmp_path, 3, tp=3))
    with pytest.raises(LmforgeError, match=r"^model.n_heads=4 does not divide by parallel.tp=3"):
        validate_inputs(cfg)
    cfg = TrainConfig.model_validate(config(packed_data, tmp_path, 4, tp=2))
    validate_inputs(cfg)  # 2 data-parallel ranks x 2 rows x 2 micro-steps x 64 tokens = 512


@pytest.mark.parametrize(
    ("lora", "eval_tasks", "message"),
    [
        (True, False, "parallel.tp=2 with LoRA is not supported"),
        (False, True, "train.eval_tasks do not run under parallel.tp=2"),
    ],
)
def test_what_tensor_parallelism_does_not_cover_is_refused_in_one_line(lora, eval_tasks, message):
    with pytest.raises(LmforgeError, match=message):
        check_tensor_parallel_use(ParallelConfig(tp=2), lora, eval_tasks)
    check_tensor_parallel_use(ParallelConfig(tp=1), lora, eval_tasks)  # no tp: nothing to refuse


def test_tp_ranks_of_a_group_read_the_same_rows_and_dp_ranks_different_ones():
    dims = parallel_dims(ParallelConfig(tp=2), 4)
    assert (dims.dp_shard, dims.tp, dims.dp) == (2, 2, 2)
    assert [dims.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]  # tp innermost: neighbours
    across = parallel_dims(ParallelConfig(tp=2), 4, ranks_per_node=2)  # 2 nodes of 2
    assert (across.dp_replicate, across.dp_shard, across.tp) == (2, 1, 2)  # tp in, dp across


def test_without_tensor_parallelism_the_loss_has_no_context():
    """tp=1 (no mesh, as in one process) computes the loss as before: a null context."""
    assert isinstance(loss_context(None), contextlib.nullcontext)


# ---------------------------------------------------------------- gloo ranks


HEADS = {  # the debug preset's tied head; an untied one with a soft cap that bends the logits
    "tied": model_config("debug"),
    "untied_softcap": replace(model_config("debug"), tie_embeddings=False, logit_softcap=1.0),
}


def loss_parallel_ranks(rank: int, world: int) -> dict:
    """On each tp rank: a float64 debug model under tp=2 and its one-process copy, the same
    tokens through both; the tp head's output, and both losses and gradients."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from lmforge.model.llama import Llama, cross_entropy
    from lmforge.train.loop import token_losses
    from lmforge.train.parallelize import local_loss, parallelize

    mesh = parallel_dims(ParallelConfig(tp=2), world).build_mesh("cpu")
    results = {}
    for name, arch in HEADS.items():
        torch.manual_seed(0)
        full = Llama(arch).double()
        model = parallelize(copy.deepcopy(full), fsdp=False, mesh=mesh)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(arch.vocab_size, (2, 16), generator=g)  # (B, T)
        targets = torch.randint(arch.vocab_size, (2, 16), generator=g)
        targets[0, :5] = -100  # ignored, as the masked fine-tuning loss has them
        logits = model(tokens)
        with loss_context(mesh):
            with CommDebugMode() as comm:  # what the loss alone sends
                losses = token_losses(logits, targets)  # (B, T)
                loss = local_loss(cross_entropy(logits, targets))
            loss.backward()
        want_logits = full(tokens)
        want = cross_entropy(want_logits, targets)
        want.backward()
        results[name] = {
            "dtensor": isinstance(logits, DTensor),
            "loss_collectives": {str(op): n for op, n in comm.get_comm_counts().items()},
            "shard_dims": [p.dim if p.is_shard() else None for p in logits.placements],
            "local_logits": logits.to_local().detach(),
            "full_logits": want_logits.detach(),
            "plain_losses": type(losses) is torch.Tensor and type(loss) is torch.Tensor,
            "token_losses": losses.detach(),
            "want_token_losses": token_losses(want_logits, targets).detach(),
            "loss": loss.detach(),
            "want": want.detach(),
            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()},
            "want_grads": {n: p.grad for n, p in full.named_parameters()},
        }
    return results


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tp_head_keeps_logits_sharded_on_the_vocab_and_the_loss_parallel_loss_is_exact():
    """No tp rank holds the full logits (each has V/tp columns, its slice of the vocab), and
    the loss, the per-token losses and every gradient equal the full-logits ones (float64:
    equal math, tests/numerics.py), for a tied head and for an untied soft-capped one."""
    by_rank = run_ranks(loss_parallel_ranks, 2, 2)
    for rank, results in enumerate(by_rank):
        for name, got in results.items():
            arch = HEADS[name]
            V, T = arch.vocab_size, 16
            assert got["dtensor"] and got["shard_dims"] == [2], name  # (B, T, V) on V
            local = got["local_logits"]
            assert local.shape == (2, T, V // 2), name
            # this rank's columns of the vocab; the log-softmax adds V terms split in two
            bound = model_terms(arch, T)
            forward = {"terms": max(bound["terms"], V), "depth": bound["depth"]}
            want_local = got["full_logits"][..., rank * V // 2 : (rank + 1) * V // 2]
            assert_same_math(local, want_local, torch.float64, **forward)
            assert got["plain_losses"], name  # the loop adds them to plain tensors
            # the loss gathers no logits: per-token max, sum of exponentials, target logit
            assert set(got["loss_collectives"]) == {"c10d_functional.all_reduce"}, name
            assert_same_math(got["loss"], got["want"], torch.float64, **forward)
            assert (got["token_losses"][0, :5] == 0).all()  # ignored targets cost nothing
            # token_losses computes in fp32 (`.float()`): the same logits, rounded to fp32 once
            assert_same_math(
                got["token_losses"],
                got["want_token_losses"],
                torch.float32,
                terms=V,
                stored_as=torch.float32,
            )
            assert sorted(got["grads"]) == sorted(got["want_grads"])
            for param, grad in got["grads"].items():
                # backward runs the forward's reductions again, in reverse
                backward = {**forward, "depth": 2 * forward["depth"]}
                assert_same_math(grad, got["want_grads"][param], torch.float64, **backward)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tp2_learns_the_one_process_curve_and_exports_its_model(packed_data, one_process, tmp_path):
    out = train(packed_data, tmp_path / "tp2", 2, tp=2)
    assert_same_curve(curve(out), curve(one_process))
    assert_same_weights(artifact(out), artifact(one_process))
    layout = json.loads((out / "layout.json").read_text())
    assert layout["dims"]["tp"] == 2 and layout["dims"]["dp_shard"] == 1
    assert [r["coords"]["tp"] for r in layout["ranks"]] == [0, 1]


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_fsdp_by_tp_on_four_ranks_learns_the_one_process_curve(packed_data, one_process, tmp_path):
    out = train(packed_data, tmp_path / "fsdp-tp", 4, tp=2)
    assert_same_curve(curve(out), curve(one_process))
    assert_same_weights(artifact(out), artifact(one_process))
    layout = json.loads((out / "layout.json").read_text())
    assert (layout["dims"]["dp_shard"], layout["dims"]["tp"]) == (2, 2)


def finetune_spec(base: str, data: str, out: str, workers: int):
    """Full fine-tuning (the masked loss over packed chat documents) of `base` for STEPS steps:
    tp=2 on 2 workers, or one process."""
    from tests.finetune.test_finetune import ft_config

    cfg = ft_config(
        Path(base),
        Path(out).parent,
        train={"max_steps": STEPS, "eval_every": 2, "micro_batch_size": 2},
        checkpoint={"every_steps": 0},
        resources={"num_workers": workers},
        parallel={"fsdp": True, "tp": 2} if workers > 1 else {},
    )
    return cfg.loop_spec(out, data, workers=workers)


def finetune_ranks(rank: int, world: int, base: str, data: str, out: str) -> dict:
    from lmforge.train.loop import train_loop
    from lmforge.train.run import WorkerEnv

    train_loop(
        finetune_spec(base, data, out, world), WorkerEnv(rank, world, torch.device("cpu"), False)
    )
    return {}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_full_fine_tuning_under_tp2_learns_the_one_process_curve(tmp_path):
    """The masked loss (a sum over target tokens, scaled by the global count) and the masked
    validation loss, both loss-parallel under tp=2, follow the one-process run: train loss at
    every step, val loss before training (step 0) and at steps 2 and 4."""
    from lmforge.finetune.data import SftDataConfig, prepare_sft
    from lmforge.train.loop import train_loop
    from lmforge.train.run import WorkerEnv
    from tests.train.conftest import pretrained_base

    base = pretrained_base(tmp_path / "base", steps=2)
    data = str(tmp_path / "sft")
    tokenizer = (base / "tokenizer.json").read_text()
    prepare_sft(SftDataConfig(max_examples=200, seq_len=128), tokenizer, data, 128, use_ray=False)
    one, tp = str(tmp_path / "one"), str(tmp_path / "tp")
    train_loop(finetune_spec(str(base), data, one, 1), WorkerEnv(0, 1, torch.device("cpu"), False))
    run_ranks(finetune_ranks, 2, 2, str(base), data, tp)
    arch = model_config("debug")

    def rows(out: str, key: str) -> dict[int, float]:
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        return {m["step"]: m[key] for m in map(json.loads, lines) if key in m}

    for key, steps in (("loss", [1, 2, 3, 4]), ("val_loss", [0, 2, 4])):
        got, want = rows(tp, key), rows(one, key)
        assert list(got) == list(want) == steps, key
        for step, value in want.items():
            tol = loss_curve_tolerance(arch, 128, value, step)
            assert got[step] == pytest.approx(value, abs=tol), (key, step)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checkpoints_reshard_between_tp_fsdp_and_one_process(packed_data, tmp_path):
    """The step-4 checkpoint of a tp=2 run, resumed with nothing left to train, exports the
    tp=2 run's weights exactly (DCP copies the shards, no arithmetic) in fsdp=2 and in one
    process; an fsdp=2 continuation to step 6, resumed under tp=2, exports its weights exactly."""
    tp = train(packed_data, tmp_path / "tp2", 2, tp=2)
    want = artifact(tp)

    def resumed_from(src: Path, name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(src / "checkpoints", dest / "checkpoints")
        return dest

    one = train(packed_data, resumed_from(tp, "one"), 1, resume=True)
    torch.testing.assert_close(artifact(one), want, atol=0, rtol=0)
    fsdp = train(packed_data, resumed_from(tp, "fsdp2"), 2, steps=6, resume=True)
    assert list(curve(fsdp)) == [5, 6]  # it went on from step 4
    back = train(packed_data, resumed_from(fsdp, "back"), 2, steps=6, resume=True, tp=2)
    torch.testing.assert_close(artifact(back), artifact(fsdp), atol=0, rtol=0)


# ---------------------------------------------------------------- Ray Train


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_train_with_tp2_learns_the_one_process_curve(
    ray_local, packed_data, one_process, tmp_path
):
    from lmforge.stage import get_stage, run_stage

    cfg = TrainConfig.model_validate(config(packed_data, tmp_path / "runs", 2, tp=2))
    result = run_stage(get_stage("train"), cfg, quiet=True)
    out = Path(result.output)
    assert_same_curve(curve(out), curve(one_process))
    assert json.loads((out / "layout.json").read_text())["dims"]["tp"] == 2


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_keep_each_tp_group_inside_a_node_and_learn_the_one_process_curve(
    packed_data, one_process, tmp_path
):
    """2 nodes x 2 CPUs, 4 workers: tp=2 inside a node, data parallel across. Runs in a subprocess: the session's embedded Ray owns this one."""
    cfg = config(packed_data, tmp_path / "runs", 4, tp=2)
    cfg["resources"]["placement_strategy"] = "SPREAD"
    out = train_on_two_nodes(cfg, cpus_per_node=2)  # 4 workers, a tp=2 group per node
    layout = json.loads((out / "layout.json").read_text())
    nodes = [r["node"] for r in layout["ranks"]]
    assert len(set(nodes)) == 2  # both nodes train
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3]  # each tp group (0,1), (2,3) on one node
    assert layout["tp_groups_within_nodes"]
    # Data parallel across the nodes. (Not HSDP here: Ray Train counts a node's workers by IP,
    # and the Cluster's two raylets share 127.0.0.1, so ranks_per_node reads 4; real nodes
    # give (dp_replicate, dp_shard) = (2, 1), tests/train/test_layout.py.)
    assert layout["dims"]["dp_replicate"] * layout["dims"]["dp_shard"] == 2
    assert [r["coords"]["tp"] for r in layout["ranks"]] == [0, 1, 0, 1]
    assert_same_curve(curve(out), curve(one_process))
