"""Fine-tuning with the pretraining loop: from a base artifact, full and LoRA, masks, resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import LmforgeError
from lmforge.finetune.config import FinetuneConfig
from lmforge.model.artifact import load_model, read_version
from lmforge.train.checkpoint import MARKER, complete_checkpoints
from lmforge.train.loop import run_local
from tests.numerics import loss_curve_tolerance
from tests.train.conftest import one_torch_thread, pretrained_base  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A debug-preset model pretrained for a few steps: the artifact fine-tuning starts from."""
    return pretrained_base(tmp_path_factory.mktemp("ft-base"))


@pytest.fixture(scope="module")
def sft_data(base, tmp_path_factory) -> Path:
    """The built-in SFT data (a sample of it) prepared in-process: val = held-out modules."""
    from lmforge.finetune.data import SftDataConfig, prepare_sft

    out = tmp_path_factory.mktemp("ft-data") / "sft"
    cfg = SftDataConfig(max_examples=400, seq_len=128)
    prepare_sft(cfg, (base / "tokenizer.json").read_text(), str(out), 128, use_ray=False)
    return out


def ft_config(base: Path, runs: Path, **sections) -> FinetuneConfig:
    cfg = {
        "name": "ft",
        "runs_dir": str(runs),
        "base": str(base),
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "global_batch_tokens": 1024, "micro_batch_size": 4, "max_steps": 12, "log_every": 1,
            "eval_every": 6, "eval_sequences": 16, "precision": "fp32", "peak_tflops": 0.1,
        },
        "checkpoint": {"every_steps": 6, "keep_last": 2},
        "resources": {"num_workers": 1},
        "parallel": {"fsdp": False},
    }  # fmt: skip
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return FinetuneConfig.model_validate(cfg)


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def val_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["val_loss"] for m in metrics(out) if "val_loss" in m}


def test_full_fine_tuning_lowers_the_held_out_loss_and_records_lineage(base, sft_data, tmp_path):
    out = tmp_path / "full"
    summary = run_local(ft_config(base, tmp_path), str(out), data_path=str(sft_data))
    val = val_losses(out)
    assert sorted(val) == [0, 6, 12]  # step 0: the base model, before any update
    assert val[12] < val[0] - 0.3, val  # the held-out modules' answers got more likely
    assert summary["val_loss"] == pytest.approx(val[12])
    # its curve: the base model's val loss at step 0, then the fine-tune's
    from lmforge.plots import loss_series, read_metrics

    assert loss_series(read_metrics(str(out)))["val_loss"] == sorted(val.items())
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    version = read_version(str(out / "model"))
    assert version["parent"] == read_version(str(base))["version"]
    assert version["stage"] == "finetune" and version["parent_path"] == str(base)
    # Its own drift baseline: the val loss on the answers' tokens, in bits per answer byte.
    manifest = json.loads((sft_data / "manifest.json").read_text())
    per_byte = manifest["loss_tokens_val"] / manifest["loss_bytes_val"]
    assert version["val_bpb"] == pytest.approx(val[12] / math.log(2) * per_byte)
    assert summary["val_bpb"] == version["val_bpb"] and "val_bpb" in metrics(out)[-1]
    # The artifact is a plain model that loads and differs from the base everywhere.
    tuned = load_model(str(out / "model")).state_dict()
    first = load_model(str(base)).state_dict()
    assert set(tuned) == set(first)
    assert not torch.equal(tuned["layers.0.attn.wq.weight"], first["layers.0.attn.wq.weight"])


def test_the_drift_baseline_is_the_fine_tunes_own_else_its_bases_with_a_note(tmp_path):
    from lmforge.finetune.stage import drift_baseline
    from lmforge.model.artifact import write_version
    from lmforge.serve.drift import served_model_info

    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    write_version(base, version="v-base00000000", stage="train", val_bpb=1.25)
    write_version(tuned, version="v-tuned0000000", stage="finetune", parent="v-base00000000")
    assert drift_baseline(tuned, base) == {
        "val_bpb": 1.25,
        "val_bpb_source": "parent v-base00000000",
    }
    record = read_version(tuned)
    assert (record["version"], record["parent"]) == ("v-tuned0000000", "v-base00000000")
    assert served_model_info(tuned).val_bpb == 1.25  # what serving's drift ratio divides by
    write_version(tuned, version="v-tuned0000000", stage="finetune", val_bpb=0.9)
    assert drift_baseline(tuned, base) == {"val_bpb": 0.9, "val_bpb_source": "finetune val split"}
    write_version(base, version="v-base00000000", stage="train")  # nothing to inherit
    write_version(tuned, version="v-tuned0000000", stage="finetune")
    assert drift_baseline(tuned, base) == {"val_bpb": None, "val_bpb_source": None}


def test_lora_trains_and_checkpoints_only_adapters_and_merges_them(base, sft_data, tmp_path):
    out = tmp_path / "lora"
    lora = {"enabled": True, "rank": 8, "alpha": 16, "targets": ["wq", "wk", "wv", "wo", "w2"]}
    cfg = ft_config(base, tmp_path, lora=lora, optim={"lr": 1e-2})
    run_local(cfg, str(out), data_path=str(sft_data))
    val = val_losses(out)
    # Slower than full fine-tuning on this barely pretrained base (the head, where most of the
    # gain is, stays frozen), but the held-out loss falls.
    assert val[12] < val[0] - 0.01, val
    # The checkpoint holds the adapters and their optimizer state, not the frozen base.
    step, path = complete_checkpoints(str(out / "checkpoints"))[-1]
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(path).read_metadata().state_dict_metadata)
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert model_keys and all(".lora_a" in k or ".lora_b" in k for k in model_keys)
    # The artifact is merged: base names only, and the untargeted weights are the base's own.
    tuned = load_file(str(out / "model" / "model.safetensors"))
    first = load_file(str(base / "model.safetensors"))
    assert set(tuned) == set(first)
    assert torch.equal(tuned["layers.0.mlp.w1.weight"], first["layers.0.mlp.w1.weight"])
    assert torch.equal(tuned["tok_embeddings.weight"], first["tok_embeddings.weight"])
    assert not torch.equal(tuned["layers.0.attn.wq.weight"], first["layers.0.attn.wq.weight"])


@pytest.mark.parametrize("lora", [False, True])
def test_an_interrupted_fine_tune_resumes_exactly(base, sft_data, tmp_path, lora):
    cfg = ft_config(base, tmp_path, lora={"enabled": lora})
    out = tmp_path / "run"
    run_local(cfg, str(out), data_path=str(sft_data))
    reference = {m["step"]: m.get("loss") for m in metrics(out)}
    ckpts = out / "checkpoints"
    (ckpts / "step_00000012" / MARKER).unlink()  # crashed while saving the last checkpoint
    shutil.rmtree(out / "model")
    summary = run_local(cfg, str(out), data_path=str(sft_data))
    assert summary["steps_this_run"] == 6  # from step 6
    assert {m["step"]: m.get("loss") for m in metrics(out)} == reference


def test_the_finetune_spec_carries_base_lora_masked_loss_and_eval_at_start(tmp_path):
    from lmforge.train.config import LoopConfig, LoopSpec, LoraSpec, OptimConfig

    cfg = ft_config(
        Path("/models/base"),
        tmp_path,
        lora={"enabled": True, "rank": 4},
        train={"eval_at_start": True},
        resources={"num_workers": 3},
        parallel={"fsdp": True},
    )
    spec = cfg.loop_spec(str(tmp_path / "out"), str(tmp_path / "sft"))
    assert (spec.base, spec.model, spec.loss) == ("/models/base", None, "masked")
    assert spec.lora == LoraSpec(rank=4, alpha=16.0, dropout=0.0, targets=["wq", "wk", "wv", "wo"])
    assert spec.eval_at_start is True and spec.workers == 3 and spec.stage == "finetune"
    # The loop's sections are the pretraining classes with the fine-tuning values.
    assert type(spec.train) is LoopConfig and type(spec.optim) is OptimConfig
    assert (spec.optim.lr, spec.train.max_steps, spec.train.eval_every) == (3e-3, 12, 6)
    assert LoopSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec
    full = ft_config(Path("/models/base"), tmp_path, lora={"enabled": False, "rank": 4})
    assert full.loop_spec(str(tmp_path / "out"), str(tmp_path / "sft")).lora is None


def test_finetune_refuses_two_workers_without_fsdp_with_the_trains_line(base, tmp_path):
    from lmforge.finetune.stage import validate

    cfg = ft_config(base, tmp_path, resources={"num_workers": 2}, parallel={"fsdp": False})
    with pytest.raises(LmforgeError) as e:
        validate(cfg)
    assert str(e.value) == (
        "parallel.fsdp=false trains on one worker only: set resources.num_workers=1"
    )


def test_pretraining_on_sft_shards_is_one_clear_error(sft_data, tmp_path):
    from lmforge.train.config import TrainConfig

    cfg = TrainConfig.model_validate(
        {"data": {"path": str(sft_data)}, "model": {"preset": "debug"}}
    )
    with pytest.raises(LmforgeError, match="loss-masked SFT shards, but this run's loss is next"):
        run_local(cfg, str(tmp_path / "out"))


@pytest.mark.ray
@pytest.mark.slow
def test_finetune_stage_on_two_fsdp_workers_matches_one_process(ray_local, base, tmp_path):
    """`lmforge finetune` on Ray: Ray Data prepares the chat data, 2 FSDP2 workers train LoRA
    adapters; the loss curve equals a 1-process run of the same global batch (the loss is the
    mean over the global batch's target tokens, however they fall on the workers)."""
    from lmforge.stage import get_stage, run_stage

    sections = {
        "data": {"max_examples": 200, "seq_len": 128},
        "lora": {"enabled": True, "targets": ["wq", "wv", "w2"]},
        "train": {"max_steps": 4, "eval_every": 2, "micro_batch_size": 2},
        "checkpoint": {"every_steps": 2},
    }
    cfg = ft_config(base, tmp_path, resources={"num_workers": 2}, parallel={"fsdp": True},
                    **sections)  # fmt: skip
    result = run_stage(get_stage("finetune"), cfg, quiet=True)
    out = Path(result.output)
    assert result.summary["examples_train"] > 100 and result.summary["lora"] is True
    assert 0 < result.summary["packing_efficiency_train"] <= 1
    assert "val_loss" in result.summary["before"]
    # The artifact's drift baseline is its own (the data has a val split), and says so.
    version = read_version(str(out / "model"))
    assert version["val_bpb_source"] == "finetune val split"
    assert version["val_bpb"] == result.summary["val_bpb"] > 0
    local = tmp_path / "local"
    one = ft_config(base, tmp_path, **sections)
    run_local(one, str(local), data_path=str(out / "sft_data"))
    ray_curve = {m["step"]: m.get("loss") for m in metrics(out)}
    local_curve = {m["step"]: m.get("loss") for m in metrics(local)}
    assert ray_curve.keys() == local_curve.keys()
    arch = load_model(str(base)).cfg
    for step, loss in local_curve.items():
        if loss is not None:
            tol = loss_curve_tolerance(arch, 128, loss, step)  # tests/numerics.py
            assert ray_curve[step] == pytest.approx(loss, abs=tol), step
    assert load_model(str(out / "model")).cfg == load_model(str(base)).cfg
