import json
import subprocess
import sys

from lmforge.cli import COMMANDS


def test_help_lists_every_command_without_importing_heavy_modules():
    code = (
        "import sys; from lmforge.cli import main; main(['--help']);"
        "print('HEAVY', sorted(m for m in ('ray', 'torch', 'pydantic', 'yaml', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for name, cmd in COMMANDS.items():
        assert f"  {name}" in out and cmd.help in out
    assert "HEAVY []" in out


def test_version(cli):
    from lmforge import __version__

    assert cli("--version") == (0, f"lmforge {__version__}\n", "")


def test_unknown_command_suggests(cli):
    code, _, err = cli("pipline")
    assert code == 2 and "did you mean 'pipeline'" in err


def test_stage_help_shows_config_fields_from_descriptions(cli, capsys):
    from lmforge.check.stage import CheckConfig

    try:
        cli("check", "--help")
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for name, field in CheckConfig.model_fields.items():
        assert name in out and field.description.split("(")[0].strip() in out


def test_user_errors_are_one_line_exit_2(cli, tmp_path):
    code, _, err = cli("check", "--set", "min_cpus=lots")
    assert code == 2 and err.count("\n") == 1 and "'min_cpus'" in err and "Traceback" not in err
    code, _, err = cli("check", "-c", tmp_path / "missing.yaml")
    assert code == 2 and "config file not found" in err


def test_print_config_shows_hash_and_output(cli):
    code, out, _ = cli("check", "--set", "name=x", "--set", "runs_dir=/data/runs", "--print-config")
    assert code == 0 and "name: x" in out and "# output: /data/runs/check/x-" in out
    code2, out2, _ = cli(
        "config", "show", "check", "--set", "name=x", "--set", "runs_dir=/data/runs"
    )
    assert out2 == out


def test_config_reference_lists_every_stage(cli):
    from lmforge.stage import STAGES

    code, out, _ = cli("config", "reference")
    assert code == 0
    for name in STAGES:
        assert f"## `{name}`" in out
    assert "| `min_gpus` | `float` | `0` |" in out


def test_config_show_resolves_run_references_as_the_run_does(cli, tmp_path):
    runs = tmp_path / "runs"
    model = runs / "train" / "base-0123456789ab"
    model.mkdir(parents=True)
    (runs / "train" / "base.latest").write_text(f"{model}\n")
    args = ["--set", "model=@train/base", "--set", f"runs_dir={runs}"]
    code, shown, err = cli("config", "show", "eval", *args)
    assert code == 0, err
    assert f"model: {model}\n" in shown and "@train/base" not in shown
    assert cli("eval", *args, "--print-config")[1] == shown
    # the hash is that of the resolved path, not of the reference
    code, unresolved, _ = cli("config", "show", "eval", "--set", f"model={model}", *args[2:])
    assert unresolved == shown


def test_missing_inputs_are_one_line_before_ray_starts_and_no_run_folder(tmp_path):
    """Each stage checks its inputs before it prints the config, creates its output folder or
    starts Ray (Stage.validate), in one process without a cluster."""
    from tests.serve.conftest import make_artifact

    missing = tmp_path / "missing"
    (tmp_path / "not-data").mkdir()
    model = make_artifact(tmp_path / "model")
    cases = {
        "finetune-data": [
            "finetune",
            "--set",
            f"base={model}",
            "--set",
            f"data.sources=[{missing}]",
        ],
        "eval-task": ["eval", "--set", f"model={model}", "--set", f"tasks=[{missing}.yaml]"],
        "data": ["data", "prepare", "--set", f"sources=[{{path: {missing}.jsonl}}]"],
        "train": ["train", "--set", f"data.path={missing}"],
        "train-not-data": ["train", "--set", f"data.path={tmp_path / 'not-data'}"],
        "finetune": ["finetune", "--set", f"base={missing}"],
        "eval": ["eval", "--set", f"model={missing}"],
        "improve": ["improve", "--set", "request_log=logs"],
    }
    code = (
        "import contextlib, io, json, sys\n"
        "from lmforge.cli import main\n"
        "out = {}\n"
        f"for name, argv in {cases!r}.items():\n"
        f"    argv = argv + ['--set', 'runs_dir={tmp_path / 'runs'}']\n"
        "    err, std = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):\n"
        "        rc = main(argv)\n"
        "    ray = sys.modules.get('ray')\n"
        "    out[name] = [rc, err.getvalue(), std.getvalue(), bool(ray and ray.is_initialized())]\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True
    )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    expect = {
        "finetune-data": f"data.sources[0]: no such file {missing}",
        "eval-task": f"no task file {missing}.yaml",
        "data": str(missing),
        "train": "manifest.json",
        "train-not-data": "manifest.json",
        "finetune": str(missing),
        "eval": str(missing),
        "improve": "current",
    }
    for name, (rc, err, out, ray_started) in found.items():
        assert rc == 2 and err.startswith("lmforge: error: ") and err.count("\n") == 1, (name, err)
        assert expect[name] in err, (name, err)
        assert out == "" and not ray_started, name  # no config printed, no Ray
    assert not (tmp_path / "runs").exists()
