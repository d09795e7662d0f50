"""What reaches the console: our lines and the summary last; Ray's own logs only with -v."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from lmforge import console
from tests.conftest import REPO

# What Ray printed on the console of a successful run before (issue 13).
RAY_NOISE = [
    "Reporting training result",
    "TrainingReport(",
    "core_worker.cc",
    "max_restarts > 0",
    "Found multiple active Ray instances",
    "Traceback",
    "pid=",  # Ray's "(RayTrainWorker pid=123)" prefix of a forwarded worker line
]


def test_only_our_worker_lines_are_forwarded(capsys):
    batch = {
        "pid": 123,
        "is_err": False,
        "lines": [
            "[train] step 2/4: loss 5.91",
            "Reporting training result 1: TrainingReport(checkpoint=None, metrics={}) from rank 0",
            "[2026-11-30 12:50:20,810 W 1 1] core_worker.cc:2401: Actor has constructor "
            "arguments in the object store and max_restarts > 0.",
            ":actor_name:RayTrainWorker",
            "INFO 2026-11-30 serve replica started",
            "[eval] val: 12 requests over 1 task(s)",
        ],
    }
    console.print_our_worker_lines(batch)
    console.print_our_worker_lines({**batch, "is_err": True, "lines": ["Traceback (most", "[x] y"]})
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "[train] step 2/4: loss 5.91",
        "[eval] val: 12 requests over 1 task(s)",
    ]
    assert err.splitlines() == ["[x] y"]


def test_raylet_messages_are_dropped_unless_verbose(capsys, monkeypatch):
    """Ray's driver prints errors published to it past the dispatcher; one came after
    `lmforge serve: stopped` (a CI failure of stop 27)."""
    import ray._private.worker as ray_worker

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    console.drop_raylet_messages()
    console.drop_raylet_messages()  # idempotent: one wrapper, not two
    message = "Task ServeController.graceful_shutdown failed. There are infinite retries remaining"
    batch = {"lines": [message], "pid": "raylet", "is_err": False}
    ray_worker.print_to_stdstream(batch, ignore_prefix=False)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    ray_worker.print_to_stdstream(batch, ignore_prefix=False)
    assert message in capsys.readouterr().out


def test_dash_v_before_the_command_turns_verbose_on(monkeypatch, cli):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")  # recorded, so the test's "1" is undone
    assert not console.verbose()
    code, out, _ = cli("-v", "--version")
    assert code == 0 and out.startswith("lmforge ")
    assert console.verbose() and os.environ[console.VERBOSE_ENV] == "1"


def run_train(tmp_path, name: str, *flags: str) -> subprocess.CompletedProcess:
    from tests.train.conftest import make_packed_data, tiny_train_config

    data = tmp_path / "data"
    if not data.exists():
        make_packed_data(data)
    cfg = tiny_train_config(
        data, tmp_path / "runs", name=name,
        train={"max_steps": 4, "log_every": 2, "eval_every": 0},
        checkpoint={"every_steps": 4, "keep_last": 1},
    )  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", console.VERBOSE_ENV)}
    env["PYTHONPATH"] = str(REPO / "platform")
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *flags, "train", "-c", str(path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_a_ray_train_run_prints_our_lines_and_ends_with_ours(tmp_path):
    """2 Ray Train workers (checkpoints, reports): no Ray noise, our step lines, ours last."""
    quiet = run_train(tmp_path, "quiet")
    assert quiet.returncode == 0, quiet.stdout[-3000:] + quiet.stderr[-3000:]
    both = quiet.stdout + quiet.stderr
    assert [s for s in RAY_NOISE if s in both] == []
    lines = quiet.stdout.strip().splitlines()
    assert any(ln.startswith("[train] step 4/4 | loss ") for ln in lines), quiet.stdout[-2000:]
    assert lines[-1].startswith("[train] done in ")
    assert quiet.stderr.strip() == ""
    loud = run_train(tmp_path, "loud", "-v")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Reporting training result" in loud.stdout + loud.stderr  # -v: Ray's logs too
