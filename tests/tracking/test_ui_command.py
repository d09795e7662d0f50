"""`lmforge ui`: which store it opens, what it runs, and one clear line when it cannot."""

from __future__ import annotations

import pytest

from lmforge import LmforgeError, tracking
from lmforge.cli import main


def test_ui_prints_the_server_command_for_the_runs_store(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    run_dir = runs / "data" / "x"
    run_dir.mkdir(parents=True)
    tracking.open_run(tracking.Settings(), str(runs), str(run_dir), "data", "x", False).finish()
    argv = ["ui", "--runs-dir", str(runs), "--mlflow", "/opt/mlflow", "--port", "5055", "--print"]
    assert main(argv) == 0
    assert capsys.readouterr().out.split() == [
        "/opt/mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{runs}/mlflow.db",
        "--artifacts-destination",
        f"{runs}/mlartifacts",
        "--host",
        "127.0.0.1",
        "--port",
        "5055",
    ]


def test_ui_without_a_store_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["ui", "--runs-dir", str(tmp_path), "--mlflow", "x", "--print"]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow store in {tmp_path} (no mlflow.db)" in err and len(err.splitlines()) == 1


def test_a_tracking_uri_that_no_client_knows_is_one_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = tracking.Settings(uri="nosuchscheme://host/x")
    with pytest.raises(
        LmforgeError, match=r"tracking \(mlflow\): cannot open a run: .*tracking.backend=none"
    ):
        tracking.open_run(settings, str(tmp_path), str(tmp_path / "r"), "data", "x", False)
