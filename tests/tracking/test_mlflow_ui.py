"""`lmforge ui` serves the MLflow UI on a runs directory's embedded store, and a headless
Chromium finds a tracked run there: its name, a param and its loss curve's metric.

Needs Chromium (scripts/install_browser.sh) and an MLflow UI server: the full `mlflow`
package, which pins pyarrow below lmforge's, so it lives in its own environment given by
LMFORGE_MLFLOW (its `mlflow` executable), or uvx/pipx. Skipped, saying so, without them.
LMFORGE_SCREENSHOT=docs/img/mlflow-ui.png saves the page (the docs' screenshot)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from pydantic import Field

from lmforge import storage, tracking
from lmforge.stage import Stage, StageConfig, run_stage
from lmforge.tracking.command import server_command
from tests.conftest import REPO, free_port
from tests.serve.test_playground import CHROMIUM, DRIVER, headless_chromium

MLFLOW = os.environ.get("LMFORGE_MLFLOW")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="no chromium + chromedriver installed (run scripts/install_browser.sh)",
    ),
    pytest.mark.skipif(
        server_command(MLFLOW) is None,
        reason="no MLflow UI server: set LMFORGE_MLFLOW to the mlflow of a venv with `mlflow`",
    ),
]


class TinyConfig(StageConfig):
    name: str = Field("tiny-ui", description="run name")
    steps: int = Field(30, description="optimizer steps of the fake curve")


def tiny_run(cfg, ctx):
    """A stage whose worker logs a loss curve, as a training run's rank 0 does."""
    worker = tracking.reopen(ctx.output)
    for step in range(1, cfg.steps + 1):
        worker.log_metrics({"loss": 6.0 / step**0.5, "lr": 1e-3 * min(1, step / 5)}, step=step)
    worker.close()
    storage.write_text(storage.join(ctx.output, "report.md"), "| task | metric |\n")
    return {"loss": 6.0 / cfg.steps**0.5}


STAGE = Stage("train", TinyConfig, tiny_run, "a tiny tracked run", uses_ray=False)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    runs = tmp_path_factory.mktemp("ui") / "runs"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    result = run_stage(STAGE, TinyConfig(runs_dir=str(runs)), quiet=True)
    port = free_port()
    cmd = [sys.executable, "-m", "lmforge.cli", "ui", "--runs-dir", str(runs), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    proc = subprocess.Popen(
        [*cmd, *(["--mlflow", MLFLOW] if MLFLOW else [])],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, "lmforge ui exited"
        assert time.monotonic() < deadline, "the MLflow UI did not come up in 120 s"
        time.sleep(1)
    info = storage.read_json(storage.join(result.output, "tracking.json"))
    yield base, info
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium(page_load_timeout=60)  # MLflow's UI bundle is large
    yield driver
    driver.quit()


def test_the_mlflow_ui_shows_the_tracked_run(ui, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, info = ui
    run_page = f"{base}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"
    browser.get(f"{run_page}/model-metrics")
    WebDriverWait(browser, 120).until(lambda d: "tiny-ui" in d.page_source)
    charts = ".js-plotly-plot .trace"  # drawn (loss, lr, the summary bar), not loading
    WebDriverWait(browser, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, charts)) >= 3)
    assert "loss" in browser.page_source and info["run_id"] in browser.current_url
    shot = os.environ.get("LMFORGE_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)
    browser.get(run_page)
    browser.refresh()  # a hash change alone keeps the metrics tab
    WebDriverWait(browser, 120).until(lambda d: "Parameters" in d.page_source)
