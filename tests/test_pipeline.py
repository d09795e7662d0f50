import os
import pathlib
import shutil

import pytest

from lmforge import ConfigError, StageFailed, storage
from lmforge.project.pipeline import plan, run_pipeline
from tests import stages_for_tests as fake

PIPELINE = """
name: twostep
runs_dir: {runs}
stages:
  - stage: tests.stages_for_tests:WRITE
    id: write
    config: write.yaml
  - stage: tests.stages_for_tests:DOUBLE
    id: double
    set: {{fail: {fail}}}
"""


@pytest.fixture
def project(tmp_path):
    fake.RUNS.clear()

    def make(value=3, fail="false"):
        (tmp_path / "write.yaml").write_text(f"value: {value}\n")
        path = tmp_path / "pipeline.yaml"
        path.write_text(PIPELINE.format(runs=tmp_path / "runs", fail=fail))
        return str(path)

    return make


def test_runs_in_order_and_passes_outputs(project):
    results = run_pipeline(project(value=3))
    assert fake.RUNS == ["write", "double"]
    assert [r.status for r in results] == ["ran", "ran"]
    assert storage.read_text(storage.join(results[1].output, "value.txt")) == "6"
    assert all(storage.is_complete(r.output) for r in results)
    assert storage.exists(storage.join(results[0].output, "resolved_config.yaml"))


def test_skips_completed_stages_and_reruns_changed_ones(project):
    first = run_pipeline(project(value=3))
    fake.RUNS.clear()
    again = run_pipeline(project(value=3))
    assert fake.RUNS == [] and [r.status for r in again] == ["skipped", "skipped"]
    assert [r.output for r in again] == [r.output for r in first]
    # a changed first stage changes its hash, its output path, and so the second stage's input
    changed = run_pipeline(project(value=5))
    assert fake.RUNS == ["write", "double"]
    assert changed[0].output != first[0].output and changed[1].output != first[1].output
    assert storage.read_text(storage.join(changed[1].output, "value.txt")) == "10"
    # the earlier outputs are untouched
    assert storage.read_text(storage.join(first[1].output, "value.txt")) == "6"


def test_stops_at_first_failure_naming_the_stage(project, capsys):
    with pytest.raises(StageFailed, match=r"stopped at step 'double' \(double\): asked to fail"):
        run_pipeline(project(fail="true"))
    assert fake.RUNS == ["write", "double"]
    _, steps = plan(project(fail="true"))
    assert storage.is_complete(steps[0].output) and not storage.is_complete(steps[1].output)
    # after fixing it, only the failed stage runs
    fake.RUNS.clear()
    run_pipeline(project(fail="false"))
    assert fake.RUNS == ["double"]


def test_every_config_is_validated_before_anything_runs(project, tmp_path):
    path = project()
    (tmp_path / "pipeline.yaml").write_text(
        (tmp_path / "pipeline.yaml").read_text().replace("fail: false", "fial: false")
    )
    with pytest.raises(ConfigError, match=r"step 'double'.*unknown key 'fial'"):
        run_pipeline(path)
    assert fake.RUNS == []


def test_step_overrides_from_the_command_line(project):
    results = run_pipeline(project(value=3), extra_overrides=["write:value=4"])
    assert storage.read_text(storage.join(results[1].output, "value.txt")) == "8"


def test_bad_pipeline_files(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("stages: []\n")
    with pytest.raises(ConfigError, match="stages"):
        plan(str(bad))
    bad.write_text("stages:\n  - stage: nosuchstage\n")
    with pytest.raises(ConfigError, match="unknown stage 'nosuchstage'"):
        plan(str(bad))
    bad.write_text(
        "stages:\n  - stage: tests.stages_for_tests:WRITE\n  - stage: tests.stages_for_tests:WRITE\n"
    )
    with pytest.raises(ConfigError, match="repeated: tests.stages_for_tests:WRITE"):
        plan(str(bad))
    bad.write_text(
        "stages:\n  - stage: tests.stages_for_tests:DOUBLE\n    inputs: {source: later}\n"
    )
    with pytest.raises(ConfigError, match="not an earlier step"):
        plan(str(bad))


def test_pipeline_cli_plan_and_run(project, cli):
    path = project()
    code, out, _ = cli("pipeline", "plan", path)
    assert code == 0 and out.count("to run") == 2
    code, out, _ = cli("pipeline", "run", path)
    assert code == 0 and "summary" in out
    code, out, _ = cli("pipeline", "plan", path)
    assert out.count("complete") == 2
    code, _, err = cli("pipeline", "run", path, "--set", "value=3")
    assert code == 2 and "name the step" in err


def test_a_later_job_names_its_input_by_run(tmp_path, capsys):
    """`@write/<name>` resolves to that run's latest complete output, before hashing."""
    from lmforge.stage import stage_main

    runs = str(tmp_path / "runs")
    assert (
        stage_main(
            "tests.stages_for_tests:WRITE",
            ["--set", f"runs_dir={runs}", "--set", "value=4", "--set", "name=w"],
        )
        == 0
    )
    assert (
        stage_main(
            "tests.stages_for_tests:DOUBLE",
            ["--set", f"runs_dir={runs}", "--set", "source=@write/w"],
        )
        == 0
    )
    out = capsys.readouterr().out
    first = out.rsplit("done in", 1)[1].split(": ", 1)[1].strip()
    assert storage.read_text(storage.join(first, "value.txt")) == "8"
    # a new write run moves the pointer: the same reference now gives a new input and a new hash
    stage_main(
        "tests.stages_for_tests:WRITE",
        ["--set", f"runs_dir={runs}", "--set", "value=5", "--set", "name=w"],
    )
    stage_main(
        "tests.stages_for_tests:DOUBLE", ["--set", f"runs_dir={runs}", "--set", "source=@write/w"]
    )
    second = capsys.readouterr().out.rsplit("done in", 1)[1].split(": ", 1)[1].strip()
    assert second != first and storage.read_text(storage.join(second, "value.txt")) == "10"
    with pytest.raises(ConfigError, match="names no completed 'write' run called 'nope'"):
        stage_main(
            "tests.stages_for_tests:DOUBLE",
            ["--set", f"runs_dir={runs}", "--set", "source=@write/nope"],
        )
    with pytest.raises(ConfigError, match="expected @<stage>/<run name>"):
        stage_main(
            "tests.stages_for_tests:DOUBLE", ["--set", f"runs_dir={runs}", "--set", "source=@write"]
        )


def test_a_run_reference_in_a_pipeline_step_resolves_as_on_the_command_line(project, tmp_path):
    first = run_pipeline(project(value=4))
    only_double = tmp_path / "double.yaml"
    only_double.write_text(
        f"runs_dir: {tmp_path / 'runs'}\nstages:\n  - stage: tests.stages_for_tests:DOUBLE\n"
        "    set: {source: '@write/default'}\n"
    )
    _, steps = plan(str(only_double))
    assert steps[0].config.source == first[0].output
    assert steps[0].output == first[1].output  # the same config, so the same hash and output


def _write_then_double(runs: str, name: str = "w") -> str:
    from lmforge.stage import get_stage, run_stage

    cfg = fake.WriteConfig(name=name, value=4, runs_dir=runs)
    return run_stage(get_stage("tests.stages_for_tests:WRITE"), cfg, quiet=True).output


def test_run_references_resolve_from_any_directory_and_after_a_move(tmp_path, monkeypatch):
    """Pointers used to hold the output path as the run's working directory saw it
    (`runs/write/w-...`), which no other directory (nor a moved runs_dir) could open."""
    from lmforge.stage import latest_pointer, read_run_reference

    start, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    out = _write_then_double("runs")
    stored = (start / "runs" / "write" / "w.latest").read_text().strip()
    assert stored == "write/" + os.path.basename(out)  # relative to runs_dir
    monkeypatch.chdir(elsewhere)
    found = read_run_reference(str(start / "runs"), "@write/w", where="source")
    assert found == str(start / "runs" / "write" / os.path.basename(out))
    shutil.move(start / "runs", tmp_path / "moved")  # a re-mounted or copied runs_dir
    found = read_run_reference(str(tmp_path / "moved"), "@write/w", where="source")
    assert (pathlib.Path(found) / "value.txt").read_text() == "4"
    # pointers written before: a path relative to the old working directory, or absolute
    pointer = latest_pointer(str(tmp_path / "moved"), "write", "w")
    for old in (f"runs/{stored}", f"/gone/mount/runs/{stored}"):
        storage.write_text(pointer, old + "\n")
        assert read_run_reference(str(tmp_path / "moved"), "@write/w", "source") == found


def test_an_input_names_a_run_under_another_runs_dir(tmp_path, monkeypatch):
    """`<runs_dir>/@stage/run`, as export and serve take it, works as a stage input too, and
    is hashed as the path it names."""
    from lmforge.stage import get_stage, output_dir, resolve_input_reference

    out = _write_then_double(str(tmp_path / "a"))
    double = get_stage("tests.stages_for_tests:DOUBLE")
    cfg = fake.DoubleConfig(runs_dir=str(tmp_path / "b"), source=f"{tmp_path / 'a'}/@write/w")
    resolved = resolve_input_reference(double, cfg)
    assert resolved.source == out
    by_path = fake.DoubleConfig(runs_dir=str(tmp_path / "b"), source=out)
    assert output_dir(double, resolved) == output_dir(double, by_path)


def test_a_job_in_rays_working_dir_copy_refuses_a_relative_runs_dir(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs jobs/<stage>.py in Ray's unpacked copy of the
    directory; a relative runs_dir would put the outputs there, deleted with the job."""
    from lmforge import ConfigError
    from lmforge.stage import stage_main

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(ConfigError, match="runs_dir 'runs' is relative"):
        stage_main("tests.stages_for_tests:WRITE", ["--set", "value=3"])
    assert not (copy / "runs").exists()
    runs = tmp_path / "shared-runs"
    assert stage_main("tests.stages_for_tests:WRITE", ["--set", f"runs_dir={runs}"]) == 0
    assert list(runs.glob("write/default-*/value.txt"))
