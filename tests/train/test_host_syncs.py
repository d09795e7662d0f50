"""The loop never makes the host wait for the device except on logging, eval and checkpoint
steps; the next batches come from a background thread; the logged values are unchanged.

A host sync on a GPU is any read of a device value (`.item()`, `.tolist()`, `float(t)`,
`int(t)`, `bool(t)`, `.numpy()`), a blocking copy to the device (`.to(device)` without
`non_blocking=True`) and, for a step that otherwise never syncs, a collective. On CPU these
calls are cheap, but they are the same calls: counting them in a real CPU run of `train_loop`
shows what a CUDA run would wait on.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lmforge.train import loop as loop_module
from lmforge.train.config import TrainConfig
from lmforge.train.data import Prefetcher
from lmforge.train.loop import train_loop
from lmforge.train.optim import build_optimizer
from lmforge.train.run import WorkerEnv
from tests.train.conftest import pretrained_base, tiny_train_config

READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


class SyncCounter:
    """Counts host syncs made by the calling (training) thread, per optimizer step."""

    def __init__(self, monkeypatch) -> None:
        self.main = threading.get_ident()
        self.now: list[str] = []
        self.per_step: dict[int, list[str]] = {}
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch.Tensor, "to", self._to(torch.Tensor.to))
        for name in ("all_reduce", "all_gather", "broadcast", "barrier"):
            monkeypatch.setattr(dist, name, self._wrap(getattr(dist, name), f"dist.{name}"))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(torch.cuda.synchronize, "sync"))
        monkeypatch.setattr(loop_module, "set_lr", self.step_starts(loop_module.set_lr))

    def _wrap(self, fn, name):
        def counted(*args, **kwargs):
            if threading.get_ident() == self.main:
                self.now.append(name)
            return fn(*args, **kwargs)

        return counted

    def _to(self, fn):
        """A `.to(device)` without non_blocking in lmforge's code: on CPU every device is the
        host, so the copy it would be on a GPU is told by who asks (torch's own
        `.to(same_device)` calls, e.g. in gradient clipping, copy nothing)."""

        def to(t, *args, **kwargs):
            moves = any(isinstance(a, torch.device | str) for a in args) or "device" in kwargs
            ours = "/lmforge/" in sys._getframe(1).f_code.co_filename
            main = threading.get_ident() == self.main
            if moves and ours and main and not kwargs.get("non_blocking"):
                self.now.append("blocking .to(device)")
            return fn(t, *args, **kwargs)

        return to

    def step_starts(self, set_lr):
        """`set_lr` opens each step: what came before (model setup) is no step's."""

        def opening(*args, **kwargs):
            self.now = []
            return set_lr(*args, **kwargs)

        return opening

    def on_step(self, step: int) -> None:
        self.per_step[step], self.now = self.now, []


def fused_optimizer(cfg, model, device):
    """The optimizer a CUDA run builds (fused AdamW, which reads no step count on the host);
    CPU runs use the foreach one, whose bias correction calls `.item()` on its step tensor."""
    optimizer = build_optimizer(cfg, model, device)
    optimizer.defaults["fused"] = True
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    return optimizer


def run(spec_source, out: Path, data: str | None, on_step=None) -> list[dict]:
    env = WorkerEnv(0, 1, torch.device("cpu"), in_ray=False)
    train_loop(spec_source.loop_spec(str(out), data, workers=1), env, on_step=on_step)
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def pretrain_config(data, runs, log_every: int) -> TrainConfig:
    return TrainConfig.model_validate(
        tiny_train_config(
            data, runs, resources={"num_workers": 1}, parallel={"fsdp": False},
            train={"max_steps": 8, "log_every": log_every, "eval_every": 0},
            checkpoint={"every_steps": 0},
        )
    )  # fmt: skip


def test_non_logging_steps_make_no_host_sync(packed_data, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "build_optimizer", fused_optimizer)
    counter = SyncCounter(monkeypatch)
    run(pretrain_config(packed_data, tmp_path, 4), tmp_path / "run", None, counter.on_step)
    assert sorted(counter.per_step) == list(range(1, 9))
    quiet = {s: calls for s, calls in counter.per_step.items() if s % 4}
    assert quiet == {s: [] for s in (1, 2, 3, 5, 6, 7)}
    # The counter does see the reads of a logging step (loss and grad norm, together).
    assert counter.per_step[4] == ["tolist"]


def test_logged_loss_and_grad_norm_equal_a_sync_every_step_run(packed_data, tmp_path):
    every = run(pretrain_config(packed_data, tmp_path, 1), tmp_path / "every", None)
    fourth = run(pretrain_config(packed_data, tmp_path, 4), tmp_path / "fourth", None)
    by_step = {m["step"]: m for m in every}
    assert [m["step"] for m in fourth if "loss" in m] == [4, 8]
    for m in fourth:
        if "loss" in m:  # the same step's values, read later: the same numbers
            assert m["loss"] == by_step[m["step"]]["loss"]
            assert m["grad_norm"] == by_step[m["step"]]["grad_norm"]
            assert m["tokens_per_s"] > 0


def test_the_old_per_step_reads_give_the_loop_s_loss(packed_data, tmp_path, monkeypatch):
    """The loss a logging step reports is the step's mean loss as `.item()` read it each step."""
    seen: dict[int, float] = {}
    real_step = loop_module.train_step

    def old_way(model, optimizer, run_, batch, env, clip):
        loss, norm = real_step(model, optimizer, run_, batch, env, clip)
        seen[len(seen) + 1] = loss.item()  # what the old loop logged
        return loss, norm

    monkeypatch.setattr(loop_module, "train_step", old_way)
    logged = run(pretrain_config(packed_data, tmp_path, 4), tmp_path / "run", None)
    assert {m["step"]: m["loss"] for m in logged if "loss" in m} == {4: seen[4], 8: seen[8]}


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> tuple[Path, Path]:
    from lmforge.finetune.data import SftDataConfig, prepare_sft

    root = tmp_path_factory.mktemp("syncs-ft")
    base = pretrained_base(root, steps=2)
    out = root / "sft"
    cfg = SftDataConfig(max_examples=200, seq_len=128)
    prepare_sft(cfg, (base / "tokenizer.json").read_text(), str(out), 128, use_ray=False)
    return base, out


def test_masked_fine_tuning_steps_make_no_host_sync(sft, tmp_path, monkeypatch):
    from lmforge.finetune.config import FinetuneConfig

    base, data = sft
    cfg = FinetuneConfig.model_validate(
        {
            "name": "ft", "runs_dir": str(tmp_path), "base": str(base),
            "lora": {"rank": 4},
            "train": {
                "global_batch_tokens": 512, "micro_batch_size": 2, "max_steps": 4,
                "log_every": 4, "eval_every": 0, "precision": "fp32", "peak_tflops": 0.1,
            },
            "checkpoint": {"every_steps": 0},
            "resources": {"num_workers": 1}, "parallel": {"fsdp": False},
        }
    )  # fmt: skip
    monkeypatch.setattr(loop_module, "build_optimizer", fused_optimizer)
    counter = SyncCounter(monkeypatch)
    logged = run(cfg, tmp_path / "ft", str(data), counter.on_step)
    assert {s: counter.per_step[s] for s in (1, 2, 3)} == {1: [], 2: [], 3: []}
    assert [m["step"] for m in logged if "loss" in m] == [4]


# ---------------------------------------------------------------- the prefetcher


def test_the_prefetcher_reads_ahead_in_another_thread_in_order_and_stops_at_the_end():
    threads, asked = set(), []

    def load(step):
        threads.add(threading.current_thread().name)
        asked.append(step)
        return {"micro": [np.full((2, 3), step, dtype=np.int64)], "n": np.array([step * 1.0])}

    pre = Prefetcher(load, pin=False, end=4)
    try:
        got = [pre.get(s) for s in range(4)]
    finally:
        pre.close()
    assert threads and threading.current_thread().name not in threads
    assert sorted(asked) == [0, 1, 2, 3]  # nothing past the end is read
    for s, batch in enumerate(got):
        assert isinstance(batch["micro"][0], torch.Tensor)
        assert batch["micro"][0].dtype == torch.int64 and batch["micro"][0].shape == (2, 3)
        assert torch.equal(batch["micro"][0], torch.full((2, 3), s))
        assert batch["n"].item() == s and not batch["micro"][0].is_pinned()


def test_a_failing_read_is_raised_for_its_step():
    def load(step):
        if step == 1:
            raise ValueError("row group 7 of train/shard-0.parquet is corrupt")
        return np.zeros(1)

    pre = Prefetcher(load, pin=False)
    try:
        assert pre.get(0).shape == (1,)
        with pytest.raises(ValueError, match="row group 7"):
            pre.get(1)
    finally:
        pre.close()
