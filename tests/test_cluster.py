"""`cluster up` / `submit` / `down` against a real local Ray head with token auth."""

import os
import socket
import tempfile
import urllib.error
import urllib.request

import pytest

from lmforge import cluster
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="lmf", dir="/tmp")
    up = cluster.up(num_cpus=2, port=free_port(), dashboard_port=free_port(), temp_dir=temp_dir)
    yield up
    cluster.down()


def test_up_is_idempotent_and_token_auth_is_on(head, capsys):
    pids_before = cluster._processes_using(head.temp_dir)
    again = cluster.up(
        num_cpus=2, port=free_port(), dashboard_port=free_port(), temp_dir=head.temp_dir
    )
    assert again == head
    assert "already running" in capsys.readouterr().out
    assert sorted(cluster._processes_using(head.temp_dir)) == sorted(pids_before)
    token = cluster.read_token(head.token_path)
    assert token and len(token) == 64
    url = head.dashboard_url + "/api/jobs/"
    assert http_status(url, None) == 401
    assert http_status(url, "wrong" + token[5:]) in (401, 403)
    assert http_status(url, token) == 200
    assert head.dashboard_url.startswith("http://127.0.0.1:")
    assert cluster.status() == 0


def test_submitted_job_success_and_failure_exit_codes(head, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = cluster.submit(
        "check", "jobs/configs/check-local.yaml", ["name=ok"], address=None, working_dir=str(REPO)
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[check] 1 node(s), 2 CPU" in out and "SUCCEEDED" in out
    code = cluster.submit(
        "check",
        "jobs/configs/check-local.yaml",
        ["min_gpus=1"],
        address=head.dashboard_url,
        working_dir=str(REPO),
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "need 1 GPU(s), cluster has 0" in out and "FAILED" in out


def test_submit_validates_before_submitting(head, cli, monkeypatch):
    monkeypatch.chdir(REPO)
    code, _, err = cli(
        "submit", "check", "-c", "jobs/configs/check-local.yaml", "--set", "min_cpus=many"
    )
    assert code == 2 and "'min_cpus'" in err
    with tempfile.TemporaryDirectory(dir="/tmp") as elsewhere:
        outside = os.path.join(elsewhere, "c.yaml")
        with open(outside, "w") as f:
            f.write("name: x\n")
        code, _, err = cli("submit", "check", "-c", outside)
    assert code == 2 and "outside the working dir" in err


def test_down_stops_only_this_head():
    temp_dir = tempfile.mkdtemp(prefix="lmf", dir="/tmp")
    saved = cluster.LocalCluster.load()
    try:
        cluster.LocalCluster.state_file().unlink(missing_ok=True)
        cluster.up(num_cpus=1, port=free_port(), dashboard_port=free_port(), temp_dir=temp_dir)
        assert cluster._processes_using(temp_dir)
        assert cluster.down() == 0
        assert cluster._processes_using(temp_dir) == []
        assert cluster.LocalCluster.load() is None
    finally:
        if saved:
            saved.save()
    assert saved is None or saved.is_alive()  # the other head is untouched


def test_submit_refuses_a_relative_runs_dir(cli, monkeypatch):
    """A job runs in Ray's temporary copy of the working dir: relative outputs vanish with it."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # never reached: refused first
    code, _, err = cli("submit", "data", "--set", "runs_dir=runs/x")
    assert code == 2 and err.count("\n") == 1
    assert "runs_dir 'runs/x' is relative" in err and "--set runs_dir=/mnt/lmforge/runs" in err
    code, _, err = cli("submit", "data")  # the default, `runs`, too
    assert code == 2 and "runs_dir 'runs' is relative" in err
