"""Placement (issue 17, item 7): a tensor-parallel group, with its context-parallel ring, is on
one node (tp x cp divides the ranks per node, else one line); pipeline stages cross nodes."""

from __future__ import annotations

import pytest

from lmforge import LmforgeError
from lmforge.train.layout import ParallelConfig, check_placement, parallel_dims


def _node(rank: int, ranks_per_node: int) -> int:
    return rank // ranks_per_node  # Ray Train numbers workers node by node


def test_a_tp_group_that_would_span_nodes_is_refused_in_one_line():
    with pytest.raises(LmforgeError) as e:
        check_placement(ParallelConfig(tp=4, cp=2), ranks_per_node=4)
    message = str(e.value)
    assert "parallel.tp=4 x cp=2 = 8 does not divide the 4 workers per node" in message
    assert "\n" not in message
    with pytest.raises(LmforgeError, match="tp=3 x cp=1 = 3"):
        check_placement(ParallelConfig(tp=3), ranks_per_node=8)


@pytest.mark.parametrize("tp,cp,pp", [(8, 1, 2), (4, 2, 2), (2, 1, 4), (2, 2, 1), (1, 1, 2)])
def test_when_placement_passes_every_tp_group_is_on_one_node_and_pp_crosses_nodes(tp, cp, pp):
    per_node, world = 8, 16  # two nodes of 8
    parallel = ParallelConfig(tp=tp, cp=cp, pp=pp)
    check_placement(parallel, per_node)
    dims = parallel_dims(parallel, world, per_node)
    groups: dict[tuple, set[int]] = {}  # the tp x cp group of each rank: its other coordinates
    stages: dict[int, set[int]] = {}
    for rank in range(world):
        c = dims.coords(rank)
        key = (c["pp"], c["dp_replicate"], c["dp_shard"])
        groups.setdefault(key, set()).add(_node(rank, per_node))
        stages.setdefault(c["pp"], set()).add(_node(rank, per_node))
    assert len(groups) == world // (tp * cp)
    assert all(len(nodes) == 1 for nodes in groups.values())
    if pp == 2:  # 16 ranks, 2 stages of 8: each stage on its own node
        assert stages == {0: {0}, 1: {1}}
