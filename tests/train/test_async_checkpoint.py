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
