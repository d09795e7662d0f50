"""`lmforge quickstart` end to end, as a user runs it (a subprocess, an embedded local Ray), then
the README's newcomer path on its outputs from another directory: export, eval and serve by
run reference, and all of it again after the runs dir is copied somewhere else.

One quickstart run serves both: a second pipeline of the same stages would double the suite's
longest test for nothing.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lmforge import storage
from lmforge.project.pipeline import plan
from lmforge.project.quickstart import BASELINE_VAL_BPB, final_val_bpb, quickstart_pipeline
from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def lmforge(cwd: Path, *args: str, timeout: float = 1200, check: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "lmforge.cli", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def eval_report(runs: Path) -> dict:
    (report,) = runs.glob("eval/*/report.json")
    return json.loads(report.read_text())


def served_models(cwd: Path, artifact: str) -> list[str]:
    """`lmforge serve --model ARTIFACT --no-ray` from `cwd` (the artifact resolution a Ray Serve
    replica does, in one process): the model ids it answers with."""
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


@pytest.mark.timeout(2700)
def test_quickstart_then_the_newcomer_path_from_another_directory(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    old_umask = os.umask(0o022)
    try:  # the default workdir, runs/quickstart: relative, as a new user's is
        proc = lmforge(project, "quickstart")
    finally:
        os.umask(old_umask)
    runs = project / "runs" / "quickstart"
    cwd = os.getcwd()
    os.chdir(project)  # plan as the run did: inputs resolve to paths as seen from there
    try:
        _, steps = plan(quickstart_pipeline(), runs_dir="runs/quickstart")
    finally:
        os.chdir(cwd)
    assert steps, "the quickstart pipeline has no steps"
    for step in steps:
        assert storage.is_complete(str(project / step.output)), step.id
        assert os.path.basename(step.output) in proc.stdout  # it ends saying where each is
    # it fine-tuned and printed the held-out scores before and after
    assert "fine-tuning on held-out questions" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if "answer loss (nats/token)" in ln)
    before, after = (float(x) for x in line.split()[-3::2])
    assert after < before, line
    # it printed the pretraining's val bpb, read from its own metrics, against the previous
    # recipe's, and the change between them
    (trained,) = runs.glob("train/quickstart-*")
    bpb = final_val_bpb(str(trained))
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("pretraining: val bpb"))
    change = 100 * (bpb - BASELINE_VAL_BPB) / BASELINE_VAL_BPB
    assert line == (f"pretraining: val bpb {bpb:.3f} (before: {BASELINE_VAL_BPB:.3f} with the "
                    f"previous recipe), {change:+.1f}%")  # fmt: skip
    assert bpb < BASELINE_VAL_BPB, line  # the cpu preset's recipe learns more in the same time
    # it served the fine-tuned model and asked it through the openai client
    assert "completion  'The os module provides' -> '" in proc.stdout
    assert "chat        'What does os.getcwd do?' -> '" in proc.stdout
    # Serve's INFO lines stay in Ray's files, as with `lmforge serve` (-v shows them)
    assert "Started Serve" not in proc.stdout + proc.stderr
    assert "is ready at" not in proc.stdout + proc.stderr
    assert "(raylet)" not in proc.stdout + proc.stderr  # e.g. Serve's graceful_shutdown retried
    # every run left its figures, and the summary says where the loss curves are
    png = b"\x89PNG\r\n\x1a\n"
    for figure in ("train/quickstart-*/loss.png", "finetune/quickstart-*/loss.png",
                   "data/quickstart-*/funnel.png", "eval/quickstart-*/scores.png"):  # fmt: skip
        (path,) = runs.glob(figure)
        assert path.read_bytes()[:8] == png, figure
        if path.name == "loss.png":
            assert str(path.relative_to(project)) in proc.stdout, figure
    compared = lmforge(project, "runs", "compare", "@train/quickstart", "@finetune/quickstart",
                       "--runs-dir", "runs/quickstart", "--out", "compare.png")  # fmt: skip
    assert "config differences:" in compared.stdout and "val_loss" in compared.stdout
    assert (project / "compare.png").read_bytes()[:8] == png

    # every stage run is a run in the MLflow store under runs_dir, nested under the pipeline's
    # run, and the quickstart says how to open it
    assert "lmforge ui --runs-dir runs/quickstart" in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    tracked = client.search_runs([experiment.experiment_id])
    names = {r.info.run_name.split("/")[0] for r in tracked if r.info.status == "FINISHED"}
    assert names >= {"pipeline", *(s.stage.name for s in steps)}

    again = lmforge(project, "quickstart", "--no-serve")
    cacheable = [s for s in steps if s.stage.cacheable]
    assert again.stdout.count("output is complete, skipping") == len(cacheable)

    # run references are stored relative to runs_dir, not to the directory the run started in
    (finetuned,) = runs.glob("finetune/quickstart-*/model")
    pointer = (runs / "finetune" / "quickstart.latest").read_text().strip()
    assert pointer == str(finetuned.parent.relative_to(runs))
    # the pipeline's eval of the fine-tuned model scored the data stage's val split
    assert "bits_per_byte" in eval_report(runs)["tasks"]["val"]
    # every file is as readable as the umask allows (it was 0600: mkstemp)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in runs.rglob("*") if p.is_file()}
    assert {p for p, m in modes.items() if m & 0o044 != 0o044} == set()

    export = elsewhere / "hf"
    lmforge(elsewhere, "export", f"{runs}/@finetune/quickstart", "--out", export)
    assert (export / "model.safetensors").read_bytes()
    assert stat.S_IMODE((export / "model.safetensors").stat().st_mode) & 0o044 == 0o044

    evals = elsewhere / "evals"
    lmforge(elsewhere, "eval", "--set", f"model={runs}/@finetune/quickstart",
            "--set", f"runs_dir={evals}", "--set", "tasks=[]", "--set", "val_blocks=4",
            "--set", "resources.num_actors=1")  # fmt: skip
    report = eval_report(evals)
    assert report["model"] == str(finetuned) and "bits_per_byte" in report["tasks"]["val"]

    # a promotion written from the project dir with relative paths (as `lmforge improve` run
    # there does) still serves from elsewhere
    code = "from lmforge.model.artifact import write_serving_pointer as w; import sys; w(*sys.argv[1:])"
    subprocess.run([sys.executable, "-c", code, "runs/quickstart",
                    str(finetuned.relative_to(project))], cwd=project, check=True)  # fmt: skip
    assert served_models(elsewhere, f"{runs}/@serving") == ["lmforge"]

    # the runs dir copied (or mounted) elsewhere: every reference resolves inside the copy
    moved = elsewhere / "mnt" / "runs"
    shutil.copytree(runs, moved)
    shutil.rmtree(project / "runs")
    lmforge(elsewhere, "export", f"{moved}/@finetune/quickstart", "--out", elsewhere / "hf2")
    assert (elsewhere / "hf2" / "model.safetensors").read_bytes() == (
        export / "model.safetensors"
    ).read_bytes()
    assert served_models(tmp_path, f"{moved}/@serving") == ["lmforge"]
