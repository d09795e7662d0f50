"""`lmforge quickstart` end to end, as a user runs it: a subprocess, an embedded local Ray."""

import os
import subprocess
import sys

import pytest

from lmforge import storage
from lmforge.pipeline import plan
from lmforge.quickstart import quickstart_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def run_quickstart(workdir, *extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "lmforge.cli", "quickstart", "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)


@pytest.mark.timeout(1500)
def test_quickstart_runs_every_stage_then_skips_them(tmp_path):
    proc = run_quickstart(tmp_path / "qs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, steps = plan(quickstart_pipeline(), runs_dir=str(tmp_path / "qs"))
    assert steps, "the quickstart pipeline has no steps"
    for step in steps:
        assert storage.is_complete(step.output), step.id
        assert step.output in proc.stdout  # it ends by printing where each output is
    # it fine-tuned and printed the held-out scores before and after
    assert "fine-tuning on held-out questions" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if "answer loss (nats/token)" in ln)
    before, after = (float(x) for x in line.split()[-3::2])
    assert after < before, line
    # it served the fine-tuned model and asked it through the openai client
    assert "completion  'The os module provides' -> '" in proc.stdout
    assert "chat        'What does os.getcwd do?' -> '" in proc.stdout
    again = run_quickstart(tmp_path / "qs", "--no-serve")
    assert again.returncode == 0, again.stderr[-3000:]
    cacheable = [s for s in steps if s.stage.cacheable]
    assert again.stdout.count("output is complete, skipping") == len(cacheable)
