"""loss.png of a training run: drawn by rank 0 at each checkpoint (in a background thread) and
at the end, from the metrics.jsonl lines written up to then; a failure to draw is a warning,
not a failed run."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import torch

from lmforge import plots
from lmforge.train import export
from lmforge.train.loop import run_local
from lmforge.train.run import WorkerEnv
from tests.train.test_loop import local_config

PNG = b"\x89PNG\r\n\x1a\n"


class InlineThread:
    """A thread that runs its target in start(): the draw happens exactly where it is started."""

    def __init__(self, target, args, daemon):
        self.target, self.args = target, args

    def start(self):
        self.target(*self.args)

    def is_alive(self):
        return False

    def join(self):
        pass


def test_loss_png_at_each_checkpoint_and_the_end(packed_data, tmp_path, monkeypatch):
    drawn: list[int] = []  # the last step in metrics.jsonl each time the curve is drawn

    def spy(run_dir: str):
        drawn.append(plots.read_metrics(run_dir)[-1]["step"])
        return plots.write_loss_curve(run_dir)

    monkeypatch.setattr(export, "write_loss_curve", spy)
    # Only export's threads run inline (see each draw's step); the data prefetcher's stay real.
    monkeypatch.setattr(export, "threading", SimpleNamespace(Thread=InlineThread))
    cfg = local_config(packed_data, tmp_path, train={"max_steps": 12, "eval_every": 4})
    out = tmp_path / "run"
    run_local(cfg, str(out))
    assert drawn == [4, 8, 12]  # checkpoints every 4 steps; the last one by export_model
    assert (out / "loss.png").read_bytes()[:8] == PNG
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    series = plots.loss_series(plots.read_metrics(str(out)))
    assert series["loss"] == [(m["step"], m["loss"]) for m in lines if "loss" in m]
    assert [s for s, _ in series["loss"]] == list(range(1, 13))
    assert [s for s, _ in series["val_loss"]] == [4, 8, 12]


def test_a_curve_that_cannot_be_drawn_is_a_warning(packed_data, tmp_path, monkeypatch, capsys):
    def broken(run_dir: str):
        raise ValueError("no fonts")

    monkeypatch.setattr(export, "write_loss_curve", broken)
    out = tmp_path / "run"
    summary = run_local(local_config(packed_data, tmp_path), str(out))
    assert summary["steps"] == 8 and (out / "model" / "model.safetensors").exists()
    assert (
        f"[train] warning: {out}/loss.png not written: ValueError: no fonts"
        in capsys.readouterr().out
    )


def test_only_rank_0_draws(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(export, "write_loss_curve", calls.append)
    export.write_curves(str(tmp_path), WorkerEnv(1, 2, torch.device("cpu"), in_ray=False))
    assert calls == []
    export.write_curves(str(tmp_path), WorkerEnv(0, 2, torch.device("cpu"), in_ray=False))
    export.wait_for_curves()
    assert calls == [str(tmp_path)]


def test_a_checkpoint_draws_in_the_background_and_the_end_waits_for_it(tmp_path, monkeypatch):
    release, order = threading.Event(), []

    def slow(run_dir: str):
        order.append("start")
        release.wait(10)
        order.append("done")

    monkeypatch.setattr(export, "write_loss_curve", slow)
    env = WorkerEnv(0, 1, torch.device("cpu"), in_ray=False)
    export.write_curves(str(tmp_path), env)  # a checkpoint: returns while drawing
    assert export._drawing.is_alive()
    export.write_curves(str(tmp_path), env)  # the next checkpoint: still drawing, skipped
    threading.Timer(0.2, release.set).start()
    export.write_curves(str(tmp_path), env, final=True)  # the end: after the pending one
    export.wait_for_curves()
    assert order == ["start", "done", "start", "done"]
