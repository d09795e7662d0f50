"""bench/gpu_train.sh runs on CPU with a tiny preset, so the GPU benchmark cannot rot between
the rare runs on a GPU: it trains through the real loop and prints the profiler breakdown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "backward", "optimizer", "sync")


@pytest.mark.slow
def test_the_gpu_train_bench_runs_the_loop_on_cpu_and_prints_the_phases(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "platform"),
    }
    args = "--device cpu --preset debug --seq-len 64 --micro-batch 2 --warmup 1 --steps 2"
    args += " --profile-steps 2 --log-every 2 --modes eager --peak-tflops 1"
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_train.sh"), *args.split()],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "the real train_loop, FSDP2 on a process group of 1" in text
    assert re.search(r"\[eager\] [\d,]+ tokens/s, MFU \d+\.\d%", text), text
    rows = {
        m[0]: m[1:]
        for m in re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", text, re.M)
    }
    assert set(rows) == set(PHASES), text
    # Each profiled step fetched its batch and ran forward, backward and the optimizer; the
    # profiled window holds one logging step, the only one that syncs.
    assert {p: int(rows[p][2]) for p in PHASES} == {
        "data": 2, "forward": 2, "backward": 2, "optimizer": 2, "sync": 1,
    }  # fmt: skip
    assert all(float(rows[p][0]) > 0 for p in ("forward", "backward", "optimizer"))
    report = json.loads((tmp_path / "gpu_train.json").read_text())
    (result,) = report["results"]
    assert result["mode"] == "eager" and result["tokens_per_s"] > 0
    assert set(result["breakdown"]) == set(PHASES)
    assert 0 < result["mfu"] <= 1
