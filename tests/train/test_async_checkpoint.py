"""Checkpoints are written in the background (`dcp.async_save`) while training goes on: what is
saved is the state at the save call, one save is in flight at a time, and a checkpoint is
marked complete only once its files are all written."""

from __future__ import annotations

import torch

from lmforge.train.checkpoint import Checkpointer, complete_checkpoints


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 8)).sum().backward()
    optim.step()
    return model, optim


def test_training_on_after_a_save_does_not_change_what_it_saved(tmp_path):
    model, optim = model_and_optimizer()
    ckpt = Checkpointer(str(tmp_path), keep_last=3, rank=0, world_size=1, in_ray=False)
    at_save = model.weight.detach().clone()
    exp_avg = optim.state[model.weight]["exp_avg"].clone()
    ckpt.save(1, 4, model, optim, {})
    with torch.no_grad():  # the next steps update the same tensors in place
        model.weight.add_(1.0)
    model(torch.randn(2, 8)).sum().backward()
    optim.step()
    ckpt.close()
    fresh = torch.nn.Linear(8, 8)
    fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    assert ckpt.restore(fresh, fresh_optim)["step"] == 1
    assert torch.equal(fresh.weight, at_save)
    assert torch.equal(fresh_optim.state[fresh.weight]["exp_avg"], exp_avg)


def test_one_save_in_flight_and_complete_only_when_written(tmp_path):
    model, optim = model_and_optimizer()
    ckpt = Checkpointer(str(tmp_path), keep_last=3, rank=0, world_size=1, in_ray=False)
    first = ckpt.save(1, 4, model, optim, {})
    assert complete_checkpoints(str(tmp_path)) == []  # in flight: not marked yet
    second = ckpt.save(2, 8, model, optim, {})  # finishes the first before it starts
    assert [p for _, p in complete_checkpoints(str(tmp_path))] == [first]
    assert ckpt.close() == second
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [1, 2]
    assert ckpt.close() is None  # nothing left in flight


def test_restore_from_an_object_store_fetches_only_the_bytes_it_reads(tmp_path, monkeypatch):
    """From a URI a worker downloads the metadata and the byte ranges of its own shards (here:
    a model that reads one of the two saved tensors), never the whole checkpoint."""
    from lmforge import storage
    from lmforge.train import checkpoint

    root = f"memory://bucket/{tmp_path.name}"
    big, small = torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(4, 4, bias=False)
    both = torch.nn.Sequential(big, small)
    optim = torch.optim.SGD(both.parameters(), lr=0.1)
    ckpt = Checkpointer(root, keep_last=2, rank=0, world_size=1, in_ray=False)
    ckpt.save(5, 10, both, optim, {})
    ckpt.close()
    fetched: list[int] = []
    fetch = checkpoint._fetch_ranges
    monkeypatch.setattr(
        checkpoint, "_fetch_ranges", lambda *a: fetched.append(fetch(*a)) or fetched[-1]
    )
    # The whole model comes back, equal, through ranged reads.
    again = torch.nn.Sequential(
        torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(4, 4, bias=False)
    )
    again_optim = torch.optim.SGD(again.parameters(), lr=0.1)
    assert Checkpointer(root, 2, 0, 1, False).restore(again, again_optim)["step"] == 5
    assert torch.equal(again[0].weight, big.weight) and torch.equal(again[1].weight, small.weight)
    shards = [f for f in storage.list_files(root) if f.endswith(".distcp")]
    total = sum(len(storage.read_bytes(f)) for f in shards)
    assert 256 * 256 * 4 <= fetched[-1] <= total
    # A reader that needs only the small tensor fetches its record (64 bytes serialised), not
    # the 256 KiB file it shares with the big one.
    path = checkpoint.latest_checkpoint(root)[1]
    with checkpoint._readable(path, 0) as (local, remote):
        state = {"model": {"1.weight": torch.zeros(4, 4)}}
        reader = checkpoint._SafeReader(local, remote=remote)
        dcp_load(state, reader)
    record = [v.length for k, v in reader.storage_data.items() if k.fqn == "model.1.weight"]
    assert fetched[-1] == sum(record) < 256 * 256 * 4 / 10
    assert torch.equal(state["model"]["1.weight"], small.weight.detach())


def dcp_load(state, reader):
    import torch.distributed.checkpoint as dcp

    from lmforge.train.checkpoint import _SafeLoadPlanner, _single_process_ok

    with _single_process_ok():
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner())
