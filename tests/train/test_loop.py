"""The per-worker loop in this process (one worker, no Ray): determinism, eval, checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.model.artifact import load_model
from lmforge.train.checkpoint import MARKER, complete_checkpoints
from lmforge.train.config import TrainConfig
from lmforge.train.loop import run_local
from tests.numerics import tolerance
from tests.train.conftest import tiny_train_config


def local_config(data, runs, **sections) -> TrainConfig:
    sections.setdefault("resources", {"num_workers": 1})
    sections.setdefault("parallel", {"fsdp": False})
    return TrainConfig.model_validate(tiny_train_config(data, runs, **sections))


def losses(out) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def test_same_seed_gives_identical_losses_and_another_seed_does_not(packed_data, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(runs, (0, 0, 1), strict=True):
        run_local(local_config(packed_data, tmp_path, train={"seed": seed}), str(out))
    a, b, c = (losses(out) for out in runs)
    assert list(a) == list(range(1, 9))
    assert a == b
    assert a != c


def test_validation_bits_per_byte_falls(packed_data, tmp_path):
    cfg = local_config(
        packed_data,
        tmp_path,
        train={"max_steps": 24, "eval_every": 8, "log_every": 8},
        checkpoint={"every_steps": 0},
    )
    summary = run_local(cfg, str(tmp_path / "out"))
    evals = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    bpb = [m["val_bpb"] for m in evals if "val_bpb" in m]
    assert len(bpb) == 3 and bpb[0] > bpb[1] > bpb[2]
    assert bpb[-1] == pytest.approx(summary["val_bpb"])
    # bits per byte = loss / ln 2 x tokens / bytes, from the manifest
    manifest = json.loads((packed_data / "manifest.json").read_text())
    expected = (
        summary["val_loss"] / 0.6931471805599453 * manifest["tokens_val"] / manifest["bytes_val"]
    )
    assert summary["val_bpb"] == pytest.approx(expected)


def test_a_checkpoint_without_its_marker_is_ignored_on_resume(packed_data, tmp_path):
    cfg = local_config(packed_data, tmp_path)
    out = tmp_path / "run"
    run_local(cfg, str(out))
    reference = losses(out)
    ckpts = out / "checkpoints"
    assert [s for s, _ in complete_checkpoints(str(ckpts))] == [4, 8]
    # A crash while step 8 was being saved: its files are there but not the marker; and a
    # half-written step 12 from some later attempt.
    (ckpts / "step_00000008" / MARKER).unlink()
    (ckpts / "step_00000012").mkdir()
    (ckpts / "step_00000012" / "__0_0.distcp").write_bytes(b"partial")
    shutil.rmtree(out / "model")
    summary = run_local(cfg, str(out))
    assert summary["steps_this_run"] == 4  # resumed from step 4, not 8 or 12
    assert losses(out) == reference  # and continued exactly as the uninterrupted run
    assert (out / "model" / "model.safetensors").exists()


def test_bf16_autocast_on_cpu_trains_close_to_fp32(packed_data, tmp_path):
    fp32 = run_local(local_config(packed_data, tmp_path), str(tmp_path / "fp32"))
    bf16 = run_local(
        local_config(packed_data, tmp_path, train={"precision": "bf16"}), str(tmp_path / "bf16")
    )
    # bf16 autocast rounds each matmul's inputs and its output to 8 bits of mantissa: two bf16
    # roundings at the loss's magnitude (tests/numerics.py)
    tol = tolerance(torch.bfloat16, terms=2, magnitude=fp32["loss"])
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=tol)
    assert bf16["loss"] != fp32["loss"]  # it really ran in bf16
    model = load_model(str(tmp_path / "bf16" / "model"))
    assert model.tok_embeddings.weight.dtype == torch.float32  # fp32 master weights saved


def test_activation_checkpointing_recomputes_the_same_numbers(packed_data, tmp_path):
    plain = tmp_path / "plain"
    ckpt = tmp_path / "ac"
    run_local(local_config(packed_data, tmp_path, train={"max_steps": 3}), str(plain))
    cfg = local_config(
        packed_data,
        tmp_path,
        train={"max_steps": 3},
        parallel={"fsdp": False, "activation_checkpointing": True},
    )
    run_local(cfg, str(ckpt))
    assert losses(ckpt) == pytest.approx(losses(plain), abs=1e-6)
    # the artifact's names are the model's own, without the wrapper's prefix
    names = set(load_model(str(ckpt / "model")).state_dict())
    assert "layers.0.attn.wq.weight" in names


def test_eval_tasks_are_scored_at_each_validation_pass(packed_data, tmp_path):
    cfg = local_config(
        packed_data,
        tmp_path,
        train={
            "max_steps": 4,
            "eval_every": 2,
            "log_every": 2,
            "eval_tasks": ["builtin:bias-pairs"],
            "eval_task_limit": 6,
        },
        checkpoint={"every_steps": 0},
    )
    run_local(cfg, str(tmp_path / "out"))
    lines = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    scored = [m for m in lines if any(k.startswith("eval/bias-pairs/") for k in m)]
    assert [m["step"] for m in scored] == [2, 4]
    for m in scored:
        # the share of 6 pairs where the model prefers the stereotyping sentence: k / 6
        share = m["eval/bias-pairs/pct_stereotype"]
        assert 0 <= share <= 1 and round(share * 6, 9) == round(share * 6)
