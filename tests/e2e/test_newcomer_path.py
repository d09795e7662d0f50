"""The README's newcomer path, from a directory other than the one the pipeline ran in.

A tiny pipeline (data -> train -> finetune -> eval, the quickstart's stages at a fraction of
its size) runs with a relative runs_dir, as `lmforge quickstart` does. Then, from elsewhere:
export and eval by run reference (`<runs_dir>/@finetune/<name>`), serve `<runs_dir>/@serving`
(`serve --no-ray`, one process: the same artifact resolution as a Ray Serve replica's), and
all of it again after the runs dir is copied somewhere else.
"""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PIPELINE = """
name: newcomer
stages:
  - stage: data
    set:
      name: nc
      sources: [{path: "builtin:python-docs", limit: 300}]
      steps: [{step: normalize}, {step: length, min_chars: 100, min_words: 15}]
      tokenizer.vocab_size: 512
      seq_len: 64
      val_fraction: 0.1
  - stage: train
    set:
      name: nc
      model.preset: debug
      train: {global_batch_tokens: 512, micro_batch_size: 2, max_steps: 4, log_every: 2, eval_every: 0, precision: fp32}
      checkpoint: {every_steps: 0}
      resources: {num_workers: 1}
      parallel.fsdp: false
  - stage: finetune
    set:
      name: nc
      data: {seq_len: 64, max_examples: 200}
      train: {global_batch_tokens: 512, micro_batch_size: 2, max_steps: 2, log_every: 1, eval_every: 0, precision: fp32}
      checkpoint: {every_steps: 0}
      resources: {num_workers: 1}
      parallel.fsdp: false
  - stage: eval
    set:
      name: nc
      tasks: []
      val_blocks: 4
      resources: {num_actors: 1, cpus_per_actor: 1}
"""


def lmforge(cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "lmforge.cli", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def eval_report(runs: Path) -> dict:
    (report,) = runs.glob("eval/*/report.json")
    return json.loads(report.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_models(cwd: Path, artifact: str) -> list[str]:
    """`lmforge serve --model ARTIFACT --no-ray` from `cwd`: the model ids it answers with."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", artifact, "--no-ray"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    return [m["id"] for m in json.load(r)["data"]]
            except OSError:
                time.sleep(1)
        raise AssertionError("serve did not answer within 180 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.timeout(2400)
def test_newcomer_path_from_another_directory(tmp_path):
    from lmforge.model.version import write_serving_pointer

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "pipeline.yaml").write_text(PIPELINE)
    old_umask = os.umask(0o022)
    try:
        lmforge(project, "pipeline", "run", "pipeline.yaml", "--runs-dir", "runs/qs")
    finally:
        os.umask(old_umask)
    runs = project / "runs" / "qs"
    (finetuned,) = runs.glob("finetune/nc-*/model")
    assert (runs / "finetune" / "nc.latest").read_text().strip() == str(
        finetuned.parent.relative_to(runs)
    )
    # the pipeline's eval of the fine-tuned model scored the data stage's val split
    assert "bits_per_byte" in eval_report(runs)["tasks"]["val"]
    # every file is as readable as the umask allows (it was 0600: mkstemp)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in runs.rglob("*") if p.is_file()}
    assert {p for p, m in modes.items() if m & 0o044 != 0o044} == set()

    export = elsewhere / "hf"
    lmforge(elsewhere, "export", f"{runs}/@finetune/nc", "--out", export)
    assert (export / "model.safetensors").read_bytes()
    assert stat.S_IMODE((export / "model.safetensors").stat().st_mode) & 0o044 == 0o044

    evals = elsewhere / "evals"
    lmforge(elsewhere, "eval", "--set", f"model={runs}/@finetune/nc", "--set", f"runs_dir={evals}",
            "--set", "tasks=[]", "--set", "val_blocks=4", "--set", "resources.num_actors=1")  # fmt: skip
    report = eval_report(evals)
    assert report["model"] == str(finetuned) and "val" in report["tasks"]

    # what `lmforge improve` does when it promotes: from the project dir, relative paths
    cwd = os.getcwd()
    os.chdir(project)
    try:
        write_serving_pointer("runs/qs", str(finetuned.relative_to(project)))
    finally:
        os.chdir(cwd)
    assert served_models(elsewhere, f"{runs}/@serving") == ["lmforge"]

    # the runs dir copied (or mounted) elsewhere: every reference resolves inside the copy
    moved = elsewhere / "mnt" / "runs"
    shutil.copytree(runs, moved)
    shutil.rmtree(project / "runs")
    lmforge(elsewhere, "export", f"{moved}/@finetune/nc", "--out", elsewhere / "hf2")
    assert (elsewhere / "hf2" / "model.safetensors").read_bytes() == (
        export / "model.safetensors"
    ).read_bytes()
    assert served_models(tmp_path, f"{moved}/@serving") == ["lmforge"]
