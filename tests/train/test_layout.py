"""Where workers run and what they control: the data-parallel mesh (FSDP on one node, HSDP
across nodes), one GPU per worker, the collective timeout and garbage collection."""

from __future__ import annotations

import gc

import pytest

from lmforge.train import run as run_module
from lmforge.train.config import TrainConfig
from lmforge.train.layout import ParallelConfig, parallel_dims
from lmforge.train.parallelize import shorten_collective_timeout


@pytest.mark.parametrize(
    ("world", "per_node", "shape"),
    [
        (1, None, (1, 1)),
        (8, None, (1, 8)),
        (8, 8, (1, 8)),
        (4, 8, (1, 4)),  # fewer workers than a node holds: one node
        (16, 8, (2, 8)),
        (64, 8, (8, 8)),
        (4, 2, (2, 2)),
        (4, 1, (4, 1)),  # one GPU per node: pure replication
        (12, 8, (1, 12)),  # uneven nodes cannot form a mesh: plain FSDP
    ],
)
def test_the_mesh_is_fsdp_on_one_node_and_hsdp_across_nodes(world, per_node, shape):
    dims = parallel_dims(ParallelConfig(), world, per_node)
    assert (dims.dp_replicate, dims.dp_shard) == shape
    assert dims.dp == dims.world == world


@pytest.mark.parametrize("gpus", [0.5, 2, 8])
def test_gpus_per_worker_other_than_0_or_1_is_refused_in_one_line(gpus):
    with pytest.raises(ValueError) as raised:
        TrainConfig.model_validate({"resources": {"num_workers": 2, "gpus_per_worker": gpus}})
    message = str(raised.value)
    assert f"resources.gpus_per_worker={gpus:g}" in message
    assert "set gpus_per_worker: 1 and num_workers to the number of GPUs" in message
    assert f"(e.g. {max(1, round(2 * gpus))})" in message


@pytest.mark.parametrize("gpus", [0, 1])
def test_gpus_per_worker_0_or_1_is_accepted(gpus):
    cfg = TrainConfig.model_validate({"resources": {"gpus_per_worker": gpus}})
    assert cfg.resources.gpus_per_worker == gpus


def test_the_timeout_is_left_alone_without_a_process_group():
    assert shorten_collective_timeout() is False


def test_the_loop_collects_garbage_itself_at_fixed_steps(monkeypatch):
    collected = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation))
    assert gc.isenabled()
    with run_module.manual_gc():
        assert not gc.isenabled()
        for step in range(1, 2 * run_module.GC_EVERY_STEPS + 1):
            run_module.collect_garbage(step)
    assert gc.isenabled()
    assert collected == [1, 1, 1]  # on entry, then at steps 50 and 100: young generations


def test_automatic_collection_stays_off_if_it_was_off():
    gc.disable()
    try:
        with run_module.manual_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
