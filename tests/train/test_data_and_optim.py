from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lmforge import LmforgeError
from lmforge.model import Llama, model_config
from lmforge.train.config import OptimConfig
from lmforge.train.data import PackedShards, batch_plan
from lmforge.train.optim import lr_at, param_groups


def all_rows(path) -> np.ndarray:
    table = pq.read_table(path / "train" / "part-00000.parquet")
    return np.stack(table.column("tokens").to_numpy(zero_copy_only=False)).astype(np.int64)


def test_rows_follow_the_file_without_shuffle_and_wrap_into_the_next_epoch(packed_data):
    shards = PackedShards(str(packed_data / "train"))
    expected = all_rows(packed_data)
    assert shards.num_rows == len(expected) and shards.seq_len == 64
    np.testing.assert_array_equal(shards.rows(5, 30), expected[5:35])  # spans row groups
    n = shards.num_rows
    np.testing.assert_array_equal(
        shards.rows(n - 2, 4), np.concatenate([expected[-2:], expected[:2]])
    )


def test_shuffled_epochs_visit_every_row_once_in_a_seeded_order(packed_data):
    a = PackedShards(str(packed_data / "train"), seed=1, shuffle=True)
    b = PackedShards(str(packed_data / "train"), seed=1, shuffle=True)
    n = a.num_rows
    epoch0, epoch1 = a.rows(0, n), a.rows(n, n)
    np.testing.assert_array_equal(epoch0, b.rows(0, n))
    key = lambda rows: sorted(map(bytes, rows.astype(np.int64)))  # noqa: E731
    assert key(epoch0) == key(all_rows(packed_data)) == key(epoch1)
    assert not np.array_equal(epoch0, epoch1)


def test_workers_split_each_global_batch_and_read_only_their_row_groups(packed_data):
    """2 workers see exactly the rows of a 1-process run with accumulation; each reads only
    the row groups (16 rows here) that its rows fall in."""
    one = batch_plan(2048, micro_batch_size=8, world_size=1, seq_len=64)
    two = batch_plan(2048, micro_batch_size=8, world_size=2, seq_len=64)
    assert (one.accum_steps, two.accum_steps) == (4, 2)
    for step in range(3):
        single = [one.micro_rows(step, 0, m) for m in range(4)]
        split = [two.micro_rows(step, r, m) for r in range(2) for m in range(2)]
        assert single == split
    reads = []
    shards = PackedShards(str(packed_data / "train"))
    original = shards._group_rows
    shards._group_rows = lambda g: reads.append(g.index) or original(g)
    for m in range(2):
        first, count = two.micro_rows(0, 1, m)  # worker 1 of step 0: rows 16..31
        shards.rows(first, count)
    assert reads == [1, 1]  # group 1 only (cached after the first read in a real run too)


def test_uneven_global_batch_is_a_clear_error():
    with pytest.raises(LmforgeError, match=r"not a multiple of .* = 512; use e.g. 1024 or 1536"):
        batch_plan(1100, micro_batch_size=4, world_size=2, seq_len=64)


def test_schedules():
    cos = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(cos, s, 110) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(cos, 59, 110) == pytest.approx(0.55)  # halfway through the decay
    assert lr_at(cos, 109, 110) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(wsd, s, 100) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(wsd, 89, 100) == pytest.approx(0.5)
    assert lr_at(wsd, 99, 100) == pytest.approx(0.0)
    const = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(const, s, 10) for s in range(10)} == {0.5}


def test_no_weight_decay_on_norms_and_embeddings():
    model = Llama(model_config("debug", tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert skipped == {"tok_embeddings.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "mlp_norm")
    }
    assert "output.weight" in {names[id(p)] for p in decay["params"]}
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())
    assert math.isclose(sum(p.numel() for p in no_decay["params"]), 512 * 64 + 5 * 64)
    assert all(p.ndim == 2 for p in decay["params"]) and torch.is_grad_enabled()
