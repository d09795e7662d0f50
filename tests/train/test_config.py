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


def node(cpus: float, gpus: float = 0, accel: str | None = None) -> dict:
    resources = {"CPU": cpus, "GPU": gpus, **({f"accelerator_type:{accel}": 1} if accel else {})}
    return {"Alive": True, "Resources": resources}


def test_resource_check_counts_workers_per_node_by_placement_strategy():
    from lmforge import LmforgeError
    from lmforge.train.config import ResourcesConfig
    from lmforge.train.stage import validate_resources

    two_gpu_nodes = [node(16, 4, "H100"), node(16, 4, "H100")]
    validate_resources(ResourcesConfig(num_workers=8, gpus_per_worker=1), two_gpu_nodes)
    validate_resources(
        ResourcesConfig(num_workers=2, gpus_per_worker=1, placement_strategy="STRICT_SPREAD"),
        two_gpu_nodes,
    )
    refused = [
        (ResourcesConfig(num_workers=9, gpus_per_worker=1), "at most 8 such worker"),
        (ResourcesConfig(num_workers=5, gpus_per_worker=1, placement_strategy="STRICT_PACK"), "STRICT_PACK"),
        (ResourcesConfig(num_workers=3, gpus_per_worker=1, placement_strategy="STRICT_SPREAD"), "2 node"),
        (ResourcesConfig(num_workers=2, gpus_per_worker=1, accelerator_type="A100"), "A100"),
        (ResourcesConfig(num_workers=4, cpus_per_worker=9), "at most 2 such"),
    ]  # fmt: skip
    for res, message in refused:
        with pytest.raises(LmforgeError, match=message):
            validate_resources(res, two_gpu_nodes)
