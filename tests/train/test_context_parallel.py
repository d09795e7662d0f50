"""Context parallelism (train/context_parallel.py). Ring attention cannot run on CPU in torch
2.13 (the CPU attention kernel has no context-parallel rule: tried on 2 gloo ranks), so cp > 1
is refused on a CPU worker in one line, and on CPU only the sharding is tested: each rank's
tokens, targets and RoPE rows are its load-balanced chunks of the sequence, and the model's
table is whole again after the micro-step. The loss equality (cp=2 vs cp=1) runs on GPUs in
bench/gpu_path_checks.py."""

from __future__ import annotations

import pytest
import torch

from lmforge import LmforgeError
from lmforge.train.context_parallel import check_context_parallel
from lmforge.train.layout import ParallelConfig
from tests.train.gloo import run_ranks


def test_cp_over_1_is_refused_on_a_cpu_worker_in_one_line():
    with pytest.raises(LmforgeError) as e:
        check_context_parallel("cpu", ParallelConfig(cp=2))
    assert "parallel.cp=2 needs GPU workers" in str(e.value) and "\n" not in str(e.value)
    assert check_context_parallel("cpu", ParallelConfig(cp=1)) is None
    assert check_context_parallel("cuda", ParallelConfig(cp=2)) is None


def _shard_on_rank(rank: int) -> dict:
    from lmforge.model import PRESETS, Llama
    from lmforge.train.context_parallel import cp_context
    from lmforge.train.layout import ParallelDims

    mesh = ParallelDims(cp=2).build_mesh("cpu")
    torch.manual_seed(0)
    model = Llama(PRESETS["debug"])
    full = model.rope
    rows = torch.arange(2 * 17).view(2, 17)  # (b, T + 1)
    with cp_context(model, mesh, rows[:, :-1], rows[:, 1:]) as (tokens, targets):
        inside = {"tokens": tokens.clone(), "targets": targets.clone(), "rope": model.rope.clone()}
    return {**inside, "restored": model.rope is full, "full": full[:16].clone()}


def test_cp_context_shards_tokens_targets_and_the_complex_rope_table_load_balanced():
    results = run_ranks(_shard_on_rank, 2)
    rows = torch.arange(2 * 17).view(2, 17)
    for rank, got in enumerate(results):
        # 4 chunks of 4 positions: rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2
        positions = torch.cat([torch.arange(4) + 4 * c for c in (rank, 3 - rank)])
        assert torch.equal(got["tokens"], rows[:, :-1][:, positions])
        assert torch.equal(got["targets"], rows[:, 1:][:, positions])
        assert got["rope"].dtype == torch.complex64
        assert torch.equal(got["rope"], got["full"][positions])  # each token's own angles
        assert got["restored"]
