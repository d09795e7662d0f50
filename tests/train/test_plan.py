from __future__ import annotations

import dataclasses
import json

import pytest

from lmforge.config import load_config
from lmforge.model import PRESETS, flops_per_token, num_params
from lmforge.project.plan import make_plan, memory_per_device
from lmforge.train.config import TrainConfig

GPU_8B = [
    "model.preset=8b",
    "resources.num_workers=64",
    "resources.gpus_per_worker=1",
    "train.max_steps=null",
    "train.max_tokens=160000000000",
    "train.global_batch_tokens=4194304",
    "train.micro_batch_size=1",
]


def test_plan_numbers_follow_the_stated_formulas():
    cfg = load_config(TrainConfig, None, GPU_8B)
    plan = make_plan(cfg, seq_len=8192)
    arch = PRESETS["8b"]
    assert plan.params == num_params(arch)
    assert plan.flops_per_token == flops_per_token(arch, 8192)
    assert plan.steps == 160_000_000_000 // 4_194_304 and plan.tokens == plan.steps * 4_194_304
    assert plan.chinchilla_tokens == 20 * plan.params
    assert plan.peak_tflops_per_device == 989.0 and plan.device == "H100"
    hours = plan.total_flops / (64 * 989e12 * 0.4) / 3600
    assert plan.wall_hours == pytest.approx(hours) and plan.device_hours == pytest.approx(
        64 * hours
    )
    mem = plan.memory_gib
    state = mem["params"] + mem["grads"] + mem["optimizer"]  # + AdamW's step, 4 B per tensor
    assert state == pytest.approx((16 * plan.params / 64 + 4 * (9 * 32 + 3)) / 2**30)


def test_plan_warns_when_a_config_will_not_fit_and_checkpointing_helps():
    cfg = load_config(TrainConfig, None, [*GPU_8B, "train.micro_batch_size=4"])
    plan = make_plan(cfg, seq_len=8192)
    assert any(
        w.startswith("will not fit") and "activation_checkpointing" in w for w in plan.warnings
    )
    full = memory_per_device(PRESETS["8b"], 8192, 4, 64, checkpointing=False)
    ckpt = memory_per_device(PRESETS["8b"], 8192, 4, 64, checkpointing=True)
    assert ckpt["activations"] < full["activations"] / 10
    small = make_plan(load_config(TrainConfig, None, [*GPU_8B, "train.micro_batch_size=1",
                                                      "parallel.activation_checkpointing=true"]), seq_len=8192)  # fmt: skip
    assert not [w for w in small.warnings if "fit" in w]


def test_plan_command_prints_a_table_and_json(cli, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("model: {preset: 1b}\nresources: {num_workers: 8, gpus_per_worker: 1}\n")
    code, out, err = cli("plan", "-c", config, "--seq-len", "2048", "--set", "train.max_steps=10")
    assert code == 0, err
    assert "parameters       1,038.7M" in out and "8 x H100" in out and "undertrained" in out
    code, out, _ = cli("plan", "-c", config, "--seq-len", "2048", "--json")
    assert code == 0 and json.loads(out)["devices"] == 8
    code, _, err = cli("plan", "-c", config, "--set", "model.presett=1b")
    assert code == 2 and "unknown key 'model.presett'" in err


def test_plan_on_a_missing_or_broken_config_is_one_line(cli, tmp_path):
    code, out, err = cli("plan", "-c", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in err and "Traceback" not in err + out
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    code, out, err = cli("plan", "-c", str(broken))
    assert code == 2 and "invalid YAML" in err and len(err.strip().splitlines()) == 1


def test_plan_takes_seq_len_from_the_data_then_the_data_config_and_says_so(cli, tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    train = configs / "train.yaml"
    train.write_text(
        f"runs_dir: {tmp_path / 'runs'}\nmodel: {{preset: 1b}}\n"
        "resources: {num_workers: 8, gpus_per_worker: 1}\n"
    )
    # no data and no data config: the 1b preset's 4096, said to be assumed
    code, out, err = cli("plan", "-c", train, "--json")
    plan = json.loads(out)
    assert code == 0 and plan["seq_len"] == 4096, err
    assert plan["seq_len_source"].startswith("assumed") and "--data-config" in plan["warnings"][0]
    # `lmforge init` writes configs/data.yaml beside it: its seq_len and vocabulary
    (configs / "data.yaml").write_text("seq_len: 2048\ntokenizer: {vocab_size: 32768}\n")
    code, out, _ = cli("plan", "-c", train, "--json")
    plan = json.loads(out)
    assert plan["seq_len"] == 2048 and plan["seq_len_source"] == str(configs / "data.yaml")
    assert plan["params"] == num_params(dataclasses.replace(PRESETS["1b"], vocab_size=32768))
    assert not [w for w in plan["warnings"] if "assumed" in w]
    code, out, _ = cli("plan", "-c", train)
    assert f"sequence length  2,048 ({configs / 'data.yaml'})" in out
    # --seq-len wins; a data output (named by a run reference) wins over the data config
    assert json.loads(cli("plan", "-c", train, "--seq-len", "1024", "--json")[1])["seq_len"] == 1024
    data = tmp_path / "runs" / "data" / "corpus-0123"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text('{"seq_len": 512, "vocab_size": 8192}')
    (tmp_path / "runs" / "data" / "corpus.latest").write_text(f"{data}\n")
    code, out, _ = cli("plan", "-c", train, "--set", "data.path=@data/corpus", "--json")
    plan = json.loads(out)
    assert plan["seq_len"] == 512 and plan["seq_len_source"] == f"the data at {data}"
