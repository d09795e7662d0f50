"""The playground page in a real headless Chromium (selenium): chat, rate, correct, compare.

Needs Debian's `chromium` and `chromium-driver` (scripts/install_browser.sh, run by `make test`);
skipped, saying so, when they are not installed."""

from __future__ import annotations

import os
import shutil

import pytest

from lmforge.model.artifact import read_version
from lmforge.serve.config import ServeArgs
from lmforge.serve.logreader import read_log
from lmforge.serve.openai import local_app
from tests.serve.conftest import live_server, make_artifact

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or (
    "/usr/lib/chromium/chromedriver" if os.path.exists("/usr/lib/chromium/chromedriver") else None
)
KEY_ENV = "LMFORGE_TEST_PLAYGROUND_KEYS"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="no chromium + chromedriver installed (run scripts/install_browser.sh)",
    ),
]


def headless_chromium(page_load_timeout: float):
    """A selenium driver of headless Chromium at a desktop window size (the caller quits it)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,900")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    driver.set_page_load_timeout(page_load_timeout)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium(page_load_timeout=30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(artifact, tmp_path_factory):
    """Two models (different weights, so different versions) behind a key, with a log."""
    other = make_artifact(tmp_path_factory.mktemp("other") / "model", seed=1)
    log_dir = str(tmp_path_factory.mktemp("log"))
    os.environ[KEY_ENV] = "sk-play"
    models = [
        {"name": "tiny", "artifact": artifact, "torch_threads": 1},
        {"name": "tiny-b", "artifact": other, "torch_threads": 1},
    ]
    args = ServeArgs(
        models=models,
        api_key_env=KEY_ENV,
        request_log={"path": log_dir, "flush_seconds": 3600},
        drift={"sample_rate": 0},
    )
    app = local_app(args)
    with live_server(app) as url:
        yield app, url, log_dir, {"tiny": artifact, "tiny-b": other}
    os.environ.pop(KEY_ENV)


def wait(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def answers(driver, column: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f"#column-{column} .answer")


def test_chat_rate_and_correct_in_the_browser(browser, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, url, log_dir, artifacts = served
    browser.get(f"{url}/playground")
    assert browser.title == "lmforge playground"
    assert "cannot list models" in wait(browser, lambda d: d.find_element(By.ID, "notice").text)
    browser.find_element(By.ID, "api-key").send_keys("sk-play", Keys.TAB)  # change: reload
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-a option")) == 2)
    assert browser.execute_script("return sessionStorage.getItem('lmforge-playground-key')") == (
        "sk-play"
    )
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")  # greedy: the answer (and its logged copy) is reproducible
    browser.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
    browser.find_element(By.ID, "send").click()
    (answer,) = wait(browser, lambda d: answers(d, "a"))
    completion_id = answer.get_attribute("data-completion-id")
    assert completion_id.startswith("chatcmpl-")
    version = read_version(artifacts["tiny"])["version"]
    assert version in answer.find_element(By.CLASS_NAME, "meta").text
    answer.find_element(By.CLASS_NAME, "thumb-up").click()
    status = answer.find_element(By.CLASS_NAME, "feedback-status")
    wait(browser, lambda d: status.text.startswith("thanks"))
    answer.find_element(By.CLASS_NAME, "correct").click()
    answer.find_element(By.CLASS_NAME, "correction").send_keys("Paris.")
    answer.find_element(By.CLASS_NAME, "send-correction").click()
    wait(browser, lambda d: "correcting" not in answer.get_attribute("class"))

    app.state.request_log.flush()
    rows = read_log(log_dir, "feedback").to_pylist()
    assert [(r["completion_id"], r["rating"], r["correction"]) for r in rows] == [
        (completion_id, 1.0, None),
        (completion_id, -1.0, "Paris."),
    ]
    assert {(r["model"], r["model_version"]) for r in rows} == {("tiny", version)}
    assert status.get_attribute("data-feedback-id") == rows[1]["feedback_id"]  # the last one
    (request,) = read_log(log_dir, "requests").to_pylist()
    assert request["completion_id"] == completion_id
    shown = browser.execute_script(
        "return arguments[0].textContent", answer.find_element(By.CLASS_NAME, "text")
    )
    assert request["completion"] == shown


def test_side_by_side_shows_both_models_answers_to_one_prompt(browser, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _, url, _, artifacts = served
    browser.get(f"{url}/playground")  # the key is still in sessionStorage
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-b option")) == 2)
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == "sk-play"
    browser.find_element(By.ID, "compare").click()
    Select(browser.find_element(By.ID, "model-b")).select_by_value("tiny-b")
    assert browser.find_element(By.ID, "column-b").is_displayed()
    browser.find_element(By.ID, "prompt").send_keys("hello world")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: answers(d, "a") and answers(d, "b"))
    (a,), (b,) = answers(browser, "a"), answers(browser, "b")
    assert (a.get_attribute("data-model"), b.get_attribute("data-model")) == ("tiny", "tiny-b")
    va, vb = (read_version(artifacts[m])["version"] for m in ("tiny", "tiny-b"))
    assert va != vb
    assert va in a.find_element(By.CLASS_NAME, "meta").text
    assert vb in b.find_element(By.CLASS_NAME, "meta").text
    assert a.get_attribute("data-completion-id") != b.get_attribute("data-completion-id")
