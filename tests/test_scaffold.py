import os
import subprocess
import sys

import pytest
import yaml

from lmforge import LmforgeError
from lmforge.config import load_config
from lmforge.project.pipeline import plan
from lmforge.project.scaffold import init_project
from lmforge.serve.command import load_serve_args
from lmforge.stage import DEFAULT_PIPELINE, get_stage
from tests.conftest import REPO

# What a project needs from data to a served, improving model.
PIPELINE = ["check", "data", "train", "finetune", "eval"]
CONFIGS = {*PIPELINE, "improve", "serve"}


def test_init_writes_a_pipeline_that_plans_as_is(tmp_path):
    written = init_project(str(tmp_path / "proj"), preset="tiny")
    proj = tmp_path / "proj"
    assert DEFAULT_PIPELINE == PIPELINE
    assert {p.stem for p in (proj / "configs").glob("*.yaml")} == CONFIGS
    assert {p.name for p in (proj / "jobs").glob("*.py")} == {
        f"{n}.py" for n in [*PIPELINE, "improve"]
    }
    assert len(written) == len(CONFIGS) + len(PIPELINE) + 1 + 1  # + jobs/improve.py, pipeline
    for name in CONFIGS - {"serve"}:
        path = proj / "configs" / f"{name}.yaml"
        text = path.read_text()
        stage = get_stage(name)
        assert "# " + stage.config_cls.model_fields["runs_dir"].description in text  # commented
        cfg = load_config(stage.config_cls, str(path))  # every written config is valid
        assert cfg.name == "proj"
    _, steps = plan(str(proj / "pipeline.yaml"))
    assert [s.id for s in steps] == PIPELINE
    assert all(s.config.name == "proj" for s in steps)
    # In the pipeline each stage reads the previous one's output.
    assert steps[3].config.base == steps[2].output and steps[4].config.model == steps[3].output


def test_init_configs_run_alone_read_the_previous_stages_run(tmp_path):
    """`lmforge train -c configs/train.yaml` (or a submitted job) outside the pipeline names its
    input as a run reference; serving and the loop use the fine-tuned model and one request log."""
    init_project(str(tmp_path / "proj"))
    configs = tmp_path / "proj" / "configs"

    def cfg(name):
        return load_config(get_stage(name).config_cls, str(configs / f"{name}.yaml"))

    assert cfg("train").data.path == "@data/proj"
    assert cfg("finetune").base == "@train/proj"
    assert cfg("eval").model == "@finetune/proj"
    serve = load_serve_args(str(configs / "serve.yaml"), [], None)
    assert [(m.name, m.artifact) for m in serve.models] == [("proj", "runs/@finetune/proj")]
    improve = cfg("improve")
    assert improve.request_log == serve.request_log.path == "runs/request-log"
    assert improve.current == "@finetune/proj"


def test_submit_from_an_init_project_runs_its_job_script(tmp_path, monkeypatch, capsys):
    """`lmforge submit` in an init'ed project finds jobs/<stage>.py and ships the project."""
    from lmforge.cluster import submit as cluster

    init_project(str(tmp_path / "proj"))
    monkeypatch.chdir(tmp_path / "proj")
    submitted = []

    class FakeJobClient:
        def submit_job(self, entrypoint, runtime_env):
            submitted.append((entrypoint, runtime_env))
            return "raysubmit_1"

    monkeypatch.setattr(cluster, "_job_client", lambda address: FakeJobClient())
    runs = tmp_path / "shared-runs"  # storage the cluster sees (a relative runs_dir would not be)
    for stage in [*PIPELINE, "improve"]:
        config = f"configs/{stage}.yaml"
        code = cluster.submit(stage, config, [f"runs_dir={runs}"], "http://head:8265", wait=False)
        assert code == 0
        assert submitted[-1][0] == f"python jobs/{stage}.py -c {config} --set runs_dir={runs}"
        assert submitted[-1][1]["working_dir"] == str(tmp_path / "proj")
    assert "submitted job raysubmit_1" in capsys.readouterr().out


def test_init_job_script_runs_its_stage(tmp_path):
    init_project(str(tmp_path / "proj"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    result = subprocess.run(
        [sys.executable, "jobs/check.py", "-c", "configs/check.yaml", "--print-config"],
        cwd=tmp_path / "proj",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["name"] == "proj"
    assert "# output: runs/check/proj-" in result.stdout


def test_init_refuses_to_overwrite_without_force(tmp_path):
    init_project(str(tmp_path / "p"))
    with pytest.raises(LmforgeError, match="already exists"):
        init_project(str(tmp_path / "p"))
    init_project(str(tmp_path / "p"), force=True)


def test_init_cli(cli, tmp_path):
    code, out, _ = cli("init", tmp_path / "q", "--preset", "small")
    assert code == 0 and "pipeline.yaml" in out and "jobs/finetune.py" in out
    assert "lmforge serve -c configs/serve.yaml" in out
