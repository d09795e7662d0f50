"""`lmforge plan` with tensor, pipeline and context parallelism: each term against numbers worked
out by hand for the debug model (exact: every value is an integer or a half, so bytes compare
with ==), the layout suggestion for the 8b preset on 8 x 80 GB, and a layout that does not
divide refused in one line."""

from __future__ import annotations

import dataclasses

from lmforge.config import load_config
from lmforge.model import PRESETS
from lmforge.project.layouts import (
    Step,
    bubble_fraction,
    communication_bytes,
    layout_numbers,
    step_seconds,
)
from lmforge.project.plan import GIB, make_plan, memory_per_device, micro_batches_in_flight
from lmforge.project.suggest import Hardware, enumerate_layouts, suggest_layouts
from lmforge.train.config import TrainConfig
from lmforge.train.layout import ParallelDims

# debug: V=512 D=64 L=2 H=4 K=2 (E=16) F=192, tied. One block: wq 4096 + wk 2048 + wv 2048 +
# wo 4096 + w1 w2 w3 36864 + two norms 128 = 49280; over tp=2: 49152 / 2 + 128 = 24704.
DEBUG = PRESETS["debug"]
TP2_PP2 = ParallelDims(pp=2, dp_shard=2, tp=2)  # 8 GPUs: one layer per stage


def _bytes(mem: dict[str, float]) -> dict[str, float]:
    return {k: v * GIB for k, v in mem.items() if k not in ("fragmentation", "total")}


def test_tp_pp_memory_is_the_last_stage_worked_by_hand():
    mem = memory_per_device(DEBUG, 16, 2, 8, False, accumulation=4, dims=TP2_PP2)
    # last stage: one block (24704) + final norm 64 + the tied head again, split over tp
    # (512 x 64 / 2 = 16384) = 41152 parameters per GPU, FSDP over dp_shard=2
    assert _bytes(mem) == {
        "params": 4 * 41152 / 2,
        "grads": 4 * 41152 / 2,
        "optimizer": 8 * 41152 / 2 + 4 * (9 + 1 + 1),  # + AdamW's step per tensor
        "unsharded_grads": 0,
        "compute_copy": 2 * (2 * 24704 + 16448),
        "grad_buffers": (2 + 4) * (24704 + 16448),
        # b T (p (10 D + 4 F) + 8 D) / tp for its one layer (1 micro-batch in flight) + the
        # final norm's b T (p D + 4 D) / tp
        "activations": 32 * (2 * (640 + 768) + 512) / 2 + 32 * (128 + 256) / 2,
        "logits": 32 * 512 * (2 * 2 + 8) / 2,  # loss parallel: the vocabulary over tp
        "cuda_and_nccl": 2 * GIB,
    }
    # with a small vocabulary the first stage (the embedding, 2 micro-batches in flight) is
    # the worst: 24704 + 64 x 64 / 2 = 26752 parameters per GPU
    small = dataclasses.replace(DEBUG, vocab_size=64)
    mem = memory_per_device(small, 16, 2, 8, False, accumulation=4, dims=TP2_PP2)
    assert _bytes(mem) == {
        "params": 4 * 26752 / 2,
        "grads": 4 * 26752 / 2,
        "optimizer": 8 * 26752 / 2 + 4 * (9 + 1),
        "unsharded_grads": 0,
        "compute_copy": 2 * (2 * 24704 + 2048),
        "grad_buffers": 6 * (24704 + 2048),
        "activations": 2 * 32 * (2 * (640 + 768) + 512) / 2,
        "logits": 0,
        "cuda_and_nccl": 2 * GIB,
    }


def test_cp_divides_the_sequence_and_fsdp_shards_over_dp_shard_x_cp():
    mem = memory_per_device(DEBUG, 16, 1, 4, False, dims=ParallelDims(dp_shard=2, cp=2))
    n = 2 * 49280 + 512 * 64 + 64  # the whole model on each rank, sharded over 2 x 2
    assert _bytes(mem) == {
        "params": 4 * n / 4,
        "grads": 4 * n / 4,
        "optimizer": 8 * n / 4 + 4 * (9 * 2 + 2),
        "unsharded_grads": 0,
        "compute_copy": 2 * (2 * 49280 + 32832),
        "grad_buffers": 6 * (49280 + 32832),
        "activations": 2 * 8 * (2 * 1408 + 512) + 8 * (128 + 256),  # T / cp = 8 tokens
        "logits": 8 * 512 * 12,
        "cuda_and_nccl": 2 * GIB,
    }


def test_pipeline_in_flight_and_bubble_follow_1f1b_and_interleaved():
    assert [micro_batches_in_flight(4, r, "1f1b") for r in range(4)] == [4, 3, 2, 1]
    # interleaved, v = 2: Megatron's pp (1 + (pp - 1) / (pp v)) on the first rank
    assert micro_batches_in_flight(4, 0, "interleaved_1f1b") == 4 * (1 + 3 / 8)
    assert bubble_fraction(4, 12, "1f1b") == 3 / 15
    assert bubble_fraction(4, 12, "interleaved_1f1b") == 3 / 15 / 2
    assert bubble_fraction(1, 12, "1f1b") == 0


def test_communication_bytes_worked_by_hand():
    step = Step(seq_len=16, micro_batch=2, micro_batches=4)
    comm = layout_numbers(DEBUG, TP2_PP2, step)["communication_gib"]
    assert {k: v * GIB for k, v in comm.items()} == {
        # 4 micro-batches x (2 bf16 all-gathers + 1 fp32 reduce-scatter) of 41152 params, 1/2
        "fsdp": 4 * (2 * 2 + 4) * 41152 / 2,
        # 4 micro-batches x 1 layer x 32 tokens x D 64 x 2 B x 1/2 x 8 collectives
        "tp": 4 * 32 * 64 * 2 / 2 * 8,
        # 4 micro-batches x (activation + gradient) of 32 tokens x 64 x 2 B, split over tp
        "pp": 4 * 2 * 32 * 64 * 2 / 2,
        "cp": 0,
    }
    cp = communication_bytes(DEBUG, ParallelDims(dp_shard=2, cp=2), Step(16, 1, 1), 1, 2)
    # K and V of 8 tokens x 2 KV heads x 16 x 2 B, 2 layers, one hop, forward + 2 x backward
    assert cp["cp"] == 2 * 1 * (2 * 8 * 2 * 16 * 2) * 3
    seconds = step_seconds(10.0, cp, ParallelDims(dp_shard=2, cp=2), Step(16, 1, 1))
    assert seconds["compute"] == 10.0 and seconds["fsdp_exposed"] == 0
    assert seconds["total"] == 10.0 + cp["cp"] / 300e9


def test_the_8b_suggestion_on_8_x_80gb_fits_and_is_the_fastest_valid_layout():
    hw = Hardware(gpus=8, memory_gib=80, peak_tflops=989, mfu=0.4)
    arch, seq, batch = PRESETS["8b"], 8192, 1024 * 1024
    ranked = suggest_layouts(arch, seq, batch, hw)
    best = ranked[0]
    assert best.memory_gib <= 80
    every = enumerate_layouts(arch, seq, batch, hw)
    assert len(every) > len(ranked) > 1  # some do not fit (plain FSDP without checkpointing)
    assert best.step_s["total"] == min(c.step_s["total"] for c in every if c.memory_gib <= 80)
    # and the plan of a config with that layout agrees on its memory
    par = best.parallel
    cfg = load_config(
        TrainConfig,
        None,
        ["model.preset=8b", "resources.num_workers=8", "resources.gpus_per_worker=1",
         f"train.global_batch_tokens={batch}", f"train.micro_batch_size={best.micro_batch}",
         f"parallel.tp={par.tp}", f"parallel.pp={par.pp}", f"parallel.cp={par.cp}",
         f"parallel.pp_schedule={par.pp_schedule}",
         f"parallel.activation_checkpointing={par.activation_checkpointing}"],
    )  # fmt: skip
    plan = make_plan(cfg, seq_len=seq)
    assert plan.memory_gib["total"] == best.memory_gib
    assert plan.layout["micro_batches"] == best.micro_batches
    assert not [w for w in plan.warnings if "fit" in w]


def test_plan_refuses_a_layout_that_does_not_divide_in_one_line(cli, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("model: {preset: 8b}\n")
    code, _, err = cli("plan", "-c", config, "--seq-len", "8192", "--gpus", "6",
                       "--set", "parallel.tp=3")  # fmt: skip
    assert code == 2 and err.strip().count("\n") == 0
    assert "model.n_heads=32 does not divide by parallel.tp=3" in err
    code, _, err = cli("plan", "-c", config, "--gpus", "6", "--set", "parallel.pp=4")
    assert code == 2 and "resources.num_workers=6 does not divide into" in err


def test_plan_suggest_prints_the_chosen_layout_and_runners_up(cli, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("model: {preset: 1b}\ntrain: {global_batch_tokens: 524288}\n")
    code, out, err = cli("plan", "-c", config, "--seq-len", "4096", "--suggest", "--gpus", "8")
    assert code == 0, err
    table = out[out.index("suggested layout for 8 GPUs of 80 GiB") :].splitlines()
    assert table[1].startswith("  --set parallel.tp=") and table[2].split()[:3] == [
        "tp",
        "pp",
        "cp",
    ]
    assert table[3].startswith("* ") and len(table) == 3 + 6
    # CPU workers: nothing to suggest, said in one line
    code, _, err = cli("plan", "-c", config, "--seq-len", "4096", "--suggest")
    assert code == 2 and err.strip().count("\n") == 0 and "--suggest plans GPU layouts" in err
