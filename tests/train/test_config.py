from __future__ import annotations

import pytest

from lmforge import ConfigError
from lmforge.config import config_hash, load_config
from lmforge.train.config import TrainConfig


def test_where_and_how_to_run_stay_out_of_the_hash_so_a_run_resumes_on_other_workers():
    base = config_hash(TrainConfig())
    moved = TrainConfig.model_validate(
        {"resources": {"num_workers": 8, "gpus_per_worker": 1}, "parallel": {"compile": True}}
    )
    assert config_hash(moved) == base
    for changed in ({"optim": {"lr": 0.1}}, {"model": {"preset": "small"}}, {"train": {"seed": 1}}):
        assert config_hash(TrainConfig.model_validate(changed)) != base


def test_model_overrides_apply_on_top_of_the_preset_and_the_data_fills_the_rest():
    cfg = load_config(TrainConfig, None, ["model.preset=tiny", "model.n_layers=3"])
    arch = cfg.model.to_llama(vocab_size=2048, seq_len=1024)
    assert (arch.dim, arch.n_layers, arch.vocab_size, arch.max_seq_len) == (384, 3, 2048, 1024)
    assert cfg.model.to_llama(vocab_size=2048, seq_len=128).max_seq_len == 512


def test_an_impossible_shape_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        load_config(TrainConfig, None, ["model.n_kv_heads=4"])  # tiny has 6 heads
    with pytest.raises(ConfigError, match="unknown key 'train.global_batch'"):
        load_config(TrainConfig, None, ["train.global_batch=3"])
