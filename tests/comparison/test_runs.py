"""`lmforge runs compare` on two small synthetic run folders, made as the stages make them:
resolved_config.yaml and metrics.jsonl (a train run), report.json (an eval run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from lmforge.comparison.runs import config_diff, flatten, load_run

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(root, name: str, lr: float, preset: str, losses: list[float], extra=None):
    run = root / "train" / name
    run.mkdir(parents=True)
    config = {"name": name.split("-")[0], "runs_dir": str(root), "model": {"preset": preset},
              "optim": {"lr": lr, "weight_decay": 0.1}, "train": {"max_steps": len(losses)},
              **(extra or {})}  # fmt: skip
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = [{"time": 0.0, "step": i + 1, "loss": loss, "lr": lr, "tokens": 256 * (i + 1)}
            for i, loss in enumerate(losses)]  # fmt: skip
    rows[-1] |= {"val_loss": losses[-1] + 0.5, "val_bpb": 1.25}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def two_runs(tmp_path):
    root = tmp_path / "runs"
    a = make_run(root, "small-aaaa", 1e-3, "tiny", [5.0, 4.0, 3.5])
    b = make_run(root, "big-bbbb", 3e-4, "small", [5.5, 4.5, 3.25, 3.0], {"seed_only_b": 7})
    (root / "train" / "big.latest").write_text("train/big-bbbb\n")  # as the stage writes it
    return root, a, b


def lines_starting(text: str, word: str) -> list[list[str]]:
    return [ln.split() for ln in text.splitlines() if ln.split()[:1] == [word]]


def test_prints_the_config_diff_and_the_final_metrics_side_by_side(two_runs, tmp_path, cli):
    root, a, b = two_runs
    out = tmp_path / "cmp.png"
    code, stdout, err = cli("runs", "compare", a, "@train/big", "--runs-dir", root, "--out", out)
    assert code == 0, err
    diff = stdout.split("config differences:")[1].split("final metrics:")[0]
    keys = [row[0] for row in (ln.split() for ln in diff.strip().splitlines()[1:])]
    # only what differs, flattened; a key one run lacks shows as absent
    assert keys == ["name", "model.preset", "optim.lr", "train.max_steps", "seed_only_b"]
    assert lines_starting(diff, "optim.lr")[0][1:] == ["0.001", "0.0003"]
    assert lines_starting(diff, "model.preset")[0][1:] == ["tiny", "small"]
    assert lines_starting(diff, "seed_only_b")[0][1:] == ["(absent)", "7"]
    metrics = stdout.split("final metrics:")[1]
    assert lines_starting(metrics, "metric")[0][1:] == ["small-aaaa", "@train/big"]
    assert lines_starting(metrics, "step")[0][1:] == ["3", "4"]
    assert lines_starting(metrics, "loss")[0][1:] == ["3.5000", "3.0000"]
    assert lines_starting(metrics, "val_loss")[0][1:] == ["4.0000", "3.5000"]
    assert lines_starting(metrics, "tokens")[0][1:] == ["768", "1,024"]
    assert f"loss curves: {out}" in stdout
    assert out.read_bytes()[:8] == PNG


def test_json_output_has_the_same_values(two_runs, tmp_path, cli):
    root, a, b = two_runs
    code, stdout, _ = cli("runs", "compare", a, b, "--out", tmp_path / "c.png", "--json",
                          "--x", "tokens")  # fmt: skip
    assert code == 0
    result = json.loads(stdout[stdout.index("\n{") :])
    assert result["runs"] == {"small-aaaa": str(a), "big-bbbb": str(b)}
    assert result["config_diff"]["optim.lr"] == [1e-3, 3e-4]
    assert "optim.weight_decay" not in result["config_diff"]
    assert result["final_metrics"]["val_bpb"] == [1.25, 1.25]
    assert result["plot"] == str(tmp_path / "c.png")


def test_flatten_and_diff_by_hand(two_runs):
    root, a, b = two_runs
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2],
                                                                     "e": {}}  # fmt: skip
    runs = [load_run(str(a), str(root)), load_run(str(a), str(root))]
    assert config_diff(runs) == []


def test_an_eval_run_compares_by_its_report(tmp_path, cli):
    for name, acc in (("e1", 0.5), ("e2", 0.75)):
        run = tmp_path / name
        run.mkdir()
        (run / "resolved_config.yaml").write_text(f"name: {name}\n")
        report = {"model": "m", "tasks": {"mc": {"acc": {"value": acc, "stderr": 0.1, "n": 8}}}}
        (run / "report.json").write_text(json.dumps(report))
    code, stdout, err = cli("runs", "compare", tmp_path / "e1", tmp_path / "e2",
                            "--out", tmp_path / "c.png")  # fmt: skip
    assert code == 0, err
    assert lines_starting(stdout, "mc/acc")[0][1:] == ["0.5000", "0.7500"]
    assert "loss curves: none" in stdout and not (tmp_path / "c.png").exists()


def test_bad_runs_are_one_line_errors_with_exit_2(two_runs, tmp_path, cli):
    root, a, _ = two_runs
    code, stdout, err = cli("runs", "compare", a, tmp_path / "nope", "--out", tmp_path / "c.png")
    assert code == 2 and err.count("\n") == 1 and "nope: no such run directory" in err
    (tmp_path / "plain").mkdir()
    code, _, err = cli("runs", "compare", a, tmp_path / "plain", "--out", tmp_path / "c.png")
    assert code == 2 and "not a stage run (no resolved_config.yaml" in err
    code, _, err = cli("runs", "compare", a, "@train/missing", "--runs-dir", root)
    assert code == 2 and "@train/missing names no completed 'train' run" in err
    (a / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    code, _, err = cli("runs", "compare", a, a, "--out", tmp_path / "c.png")
    assert code == 2 and "metrics.jsonl:2: not a JSON line" in err
    assert not (tmp_path / "c.png").exists()


def test_usage_errors_exit_2_and_help_documents_the_command(cli, two_runs):
    _, a, _ = two_runs
    with pytest.raises(SystemExit) as e:
        cli("runs", "compare", a)
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli("runs", "compare", "--help")
    assert e.value.code == 0
    code, stdout, _ = cli("--help")
    assert "runs" in stdout and "runs compare A B" in stdout


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from lmforge.cli import main\n"
        "try:\n    main(['runs', 'compare', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('pyarrow', 'yaml', 'matplotlib', 'torch', 'ray')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout and "RUN [RUN ...]" in out.stdout
