"""`open_run(defer=True)`, in-process training's run: MLflow's embedded store is opened after
the loop's first step (`first_step_done`), not before it, and nothing logged meanwhile is lost
(a metric waits for the run, so it is in the store when the call returns);
a run that ends before its first step is still recorded; a store that could be wrong (an
explicit URI) is opened at once, so its error is one line before the run."""

from __future__ import annotations

import json

import pytest

from lmforge import tracking
from lmforge.tracking.base import Opening
from tests.tracking.readers import mlflow_run


@pytest.fixture(autouse=True)
def embedded_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_deferred_run_opens_at_the_first_step_and_gets_what_was_logged_before(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "runs" / "train" / "t-abc"
    out.mkdir(parents=True)
    driver = tracking.open_run(tracking.Settings(), str(runs), str(out), "train", "t", False, True)
    assert isinstance(driver, Opening)
    driver.log_params({"optim.lr": 0.003})
    worker = tracking.reopen_in_background(str(out))  # rank 0 of the in-process loop
    worker.log_params({"device": "cpu"})
    # Nothing is opened before the first step: no store, no run recorded for workers.
    assert driver.thread.is_alive() and worker.thread.is_alive()
    assert not (runs / tracking.LOCAL_DB).exists() and not (out / tracking.TRACKING_FILE).exists()
    tracking.first_step_done()
    info = None
    for step in (1, 2, 3):
        worker.log_metrics({"loss": 6.0 - step}, step=step)
        info = info or json.loads((out / tracking.TRACKING_FILE).read_text())
        # in the store when the call returns (a crash right after loses nothing tracked)
        assert mlflow_run(info["uri"], info["run_id"])["metrics"]["loss"][-1] == (step, 6.0 - step)
    worker.close()  # the loop's summary
    driver.finish("FINISHED")
    assert info["run_id"] == driver.info["run_id"] == worker.info["run_id"]
    got = mlflow_run(info["uri"], info["run_id"])
    assert got["metrics"]["loss"] == [(1, 5.0), (2, 4.0), (3, 3.0)]
    assert got["params"] == {"optim.lr": "0.003", "device": "cpu"}
    assert got["status"] == "FINISHED" and got["run"].info.run_name == "train/t-abc"


def test_a_deferred_run_that_fails_before_its_first_step_is_recorded_failed(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "runs" / "train" / "t-abc"
    out.mkdir(parents=True)
    driver = tracking.open_run(tracking.Settings(), str(runs), str(out), "train", "t", False, True)
    driver.log_params({"optim.lr": 0.003})
    driver.finish("FAILED")  # the stage runner's `finishing`, on an error before any step
    got = mlflow_run(driver.info["uri"], driver.info["run_id"])
    assert got["status"] == "FAILED" and got["params"] == {"optim.lr": "0.003"}


def test_a_run_opened_inside_a_deferred_one_opens_it_and_nests_under_it(tmp_path):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "b").mkdir()
    outer = tracking.open_run(
        tracking.Settings(), str(runs), str(runs / "a"), "x", "a", False, True
    )
    with tracking.nested(outer):
        inner = tracking.open_run(tracking.Settings(), str(runs), str(runs / "b"), "y", "b", False)
    assert not outer.thread.is_alive()  # opened for the inner run to nest under
    got = mlflow_run(inner.info["uri"], inner.info["run_id"])
    assert got["tags"]["mlflow.parentRunId"] == outer.info["run_id"]


def test_a_store_named_by_uri_is_opened_at_once(tmp_path):
    out = tmp_path / "runs" / "train" / "t-abc"
    out.mkdir(parents=True)
    settings = tracking.Settings(uri=f"sqlite:///{tmp_path / 'server.db'}")
    tracker = tracking.open_run(
        settings, str(tmp_path / "runs"), str(out), "train", "t", False, True
    )
    assert not isinstance(tracker, Opening)
    assert json.loads((out / tracking.TRACKING_FILE).read_text())["run_id"] == tracker.run_id


def test_reopening_a_deferred_run_opens_it_now(tmp_path):
    """A stage that runs no loop but reopens its run itself (`tracking.reopen`, synchronous)
    logs into it: the deferred run opens for it instead of after a first step never taken."""
    runs, out = tmp_path / "runs", tmp_path / "runs" / "train" / "t-abc"
    out.mkdir(parents=True)
    driver = tracking.open_run(tracking.Settings(), str(runs), str(out), "train", "t", False, True)
    worker = tracking.reopen(str(out))
    worker.log_metrics({"loss": 1.0}, step=1)
    driver.finish("FINISHED")
    assert worker.backend == "mlflow"
    assert mlflow_run(driver.info["uri"], driver.info["run_id"])["metrics"]["loss"] == [(1, 1.0)]
