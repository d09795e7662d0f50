"""Resuming never runs code from a checkpoint: whatever a pickle in it names, only tensors and
plain values load; a planted object is refused with a clear error and never runs."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from lmforge.train.checkpoint import Checkpointer, UnsafeCheckpoint, step_dir_name


class Planted:
    """Unpickling this creates a file: the proof that loading ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def trained():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    return model, optim


def saved(tmp_path) -> tuple[Checkpointer, str]:
    model, optim = trained()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep_last=2, rank=0, world_size=1, in_ray=False)
    path = ckpt.save(3, 12, model, optim, {})
    assert ckpt.close() == path  # the background write finished and the marker is there
    return ckpt, path


def test_a_checkpoint_round_trips_without_unpickling(tmp_path):
    ckpt, _ = saved(tmp_path)
    expected = torch.rand(3)  # what the RNG gives right after the save
    model, optim = torch.nn.Linear(4, 4), None
    optim = torch.optim.AdamW(model.parameters(), lr=0.5)
    state = ckpt.restore(model, optim)
    assert (state["step"], state["rows"]) == (3, 12)
    reference, reference_optim = trained()
    assert torch.equal(model.weight, reference.weight)
    assert optim.param_groups[0]["lr"] == 0.01 and optim.param_groups[0]["betas"] == (0.9, 0.999)
    exp_avg = optim.state[model.weight]["exp_avg"]
    assert torch.equal(exp_avg, reference_optim.state[reference.weight]["exp_avg"])
    assert torch.equal(torch.rand(3), expected)  # the RNG state came back too


def test_a_pickled_object_in_the_rng_state_is_refused(tmp_path):
    ckpt, path = saved(tmp_path)
    ran = tmp_path / "ran"
    torch.save({"torch": Planted(str(ran))}, os.path.join(path, "rng_0.pt"))
    model = torch.nn.Linear(4, 4)
    with pytest.raises(UnsafeCheckpoint, match=f"checkpoint {path}: refusing"):
        ckpt.restore(model, torch.optim.AdamW(model.parameters()))
    assert not ran.exists()


def test_a_pickled_object_in_dcp_metadata_is_refused(tmp_path):
    ckpt, path = saved(tmp_path)
    ran = tmp_path / "ran"
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(Planted(str(ran)), f)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(UnsafeCheckpoint, match="names io.open"):
        ckpt.restore(model, torch.optim.AdamW(model.parameters()))
    assert not ran.exists()


def test_a_pickled_object_among_the_optimizer_entries_is_refused(tmp_path):
    ckpt, path = saved(tmp_path)
    ran = tmp_path / "ran"
    model, optim = trained()
    model_sd, optim_sd = get_state_dict(model, optim)
    optim_sd["param_groups"][0]["lr"] = Planted(str(ran))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    assert not ran.exists()
    model = torch.nn.Linear(4, 4)
    with pytest.raises(UnsafeCheckpoint, match=step_dir_name(3)):
        ckpt.restore(model, torch.optim.AdamW(model.parameters()))
    assert not ran.exists()
