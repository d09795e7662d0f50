"""`cluster up` / `submit` / `down` against a real local Ray head with token auth."""

import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lmforge.cluster import local as cluster
from lmforge.cluster.submit import submit
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]


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
    code = submit(
        "check", "jobs/configs/check-local.yaml", ["name=ok"], address=None, working_dir=str(REPO)
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[check] 1 node(s), 2 CPU" in out and "SUCCEEDED" in out
    code = submit(
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


def test_the_head_listens_on_the_loopback_and_down_stops_its_workers_too():
    """Every port of the head is on the loopback. Ray's workers rename themselves (`ray::IDLE`):
    their command lines do not name the temp dir, yet `down` stops them with the rest."""
    import psutil

    temp_dir = tempfile.mkdtemp(prefix="lmf", dir="/tmp")
    saved = cluster.LocalCluster.load()
    try:
        cluster.LocalCluster.state_file().unlink(missing_ok=True)
        head = cluster.up(
            num_cpus=1, port=free_port(), dashboard_port=free_port(), temp_dir=temp_dir
        )
        # A driver runs one task, so the head has a worker process.
        driver = (
            "import ray; from lmforge.cluster.local import connect; connect(); "
            "print(ray.get(ray.remote(lambda: 7).remote()))"
        )
        env = dict(os.environ, RAY_ADDRESS=head.address, RAY_AUTH_MODE="token")
        env.update(RAY_AUTH_TOKEN_PATH=head.token_path, PYTHONPATH=str(REPO / "platform"))
        run = subprocess.run(
            [sys.executable, "-c", driver], env=env, capture_output=True, text=True
        )
        assert run.stdout.strip().endswith("7"), run.stderr[-2000:]
        pids = cluster._processes_using(temp_dir)
        # The head listens on the loopback only (its GCS and raylet too), unless --host is given.
        listening = [
            (c.pid, c.laddr.ip)
            for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        ]
        loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
        assert listening and all(ip in loopback for _, ip in listening), listening
        procs = [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
        renamed = [p for p in procs if temp_dir not in " ".join(p.cmdline())]
        assert renamed, [p.cmdline()[:2] for p in procs]  # the workers are found
        assert cluster.down() == 0
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if saved:
            saved.save()


def test_submit_refuses_a_relative_runs_dir(cli, monkeypatch):
    """A job runs in Ray's temporary copy of the working dir: relative outputs vanish with it."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # never reached: refused first
    code, _, err = cli("submit", "data", "--set", "runs_dir=runs/x")
    assert code == 2 and err.count("\n") == 1
    assert "runs_dir 'runs/x' is relative" in err and "--set runs_dir=/mnt/lmforge/runs" in err
    code, _, err = cli("submit", "data")  # the default, `runs`, too
    assert code == 2 and "runs_dir 'runs' is relative" in err


def clean_env(home: Path) -> dict[str, str]:
    """A new user's shell: no RAY_* variable at all; ~ (so ~/.ray) and LMFORGE_HOME in `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), LMFORGE_HOME=str(home / "lmforge-home"))
    env["PYTHONPATH"] = str(REPO / "platform")
    return env


class FakeDashboard(http.server.BaseHTTPRequestHandler):
    """Just enough of a token-auth Ray dashboard for `lmforge submit --no-wait`: it refuses a
    request without the token as Ray does, and records what each request carried."""

    token, seen = "", []

    def answer(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            status, body = 401, b"Unauthorized: Missing authentication token"
        elif self.path == "/api/version":
            status, body = 200, json.dumps({"ray_version": "2.60.0", "version": "4"}).encode()
        elif self.path.startswith("/api/packages/"):
            status, body = (404, b"") if self.command == "GET" else (200, b"")
        else:  # POST /api/jobs/
            status, body = (
                200,
                json.dumps({"submission_id": "raysubmit_fake", "job_id": None}).encode(),
            )
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = answer

    def log_message(self, *args) -> None:
        pass


@pytest.mark.timeout(120)
def test_submit_sends_the_cluster_up_token_with_no_ray_variables_set(tmp_path):
    """`cluster up` recorded a head: `submit` in a shell with no RAY_* variable must use its
    token (Ray reads the auth mode when imported: set after the import, it is ignored)."""
    env = clean_env(tmp_path)
    token = "t" * 64
    token_file = tmp_path / ".ray" / "auth_token"
    token_file.parent.mkdir()
    token_file.write_text(token)
    FakeDashboard.token, FakeDashboard.seen = token, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeDashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    home = Path(env["LMFORGE_HOME"])
    home.mkdir()
    state = {"address": "127.0.0.1:1", "dashboard_url": url, "temp_dir": str(tmp_path),
             "token_path": str(token_file), "num_cpus": 1}  # fmt: skip
    (home / "cluster.json").write_text(json.dumps(state))
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    (project / "jobs" / "check.py").write_text("print('check')\n")
    (project / "check.yaml").write_text("name: clean\n")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lmforge.cli", "submit", "check", "-c", "check.yaml", "--no-wait"],
            env=env, cwd=project, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job raysubmit_fake: python jobs/check.py -c check.yaml" in proc.stdout
    assert [p for m, p, _ in FakeDashboard.seen if m == "POST"] == ["/api/jobs/"]
    assert all(auth == f"Bearer {token}" for *_, auth in FakeDashboard.seen), FakeDashboard.seen


def test_submit_reaches_the_head_cluster_up_started_with_no_ray_variables(tmp_path):
    env = clean_env(tmp_path)
    temp_dir = tempfile.mkdtemp(prefix="lmf", dir="/tmp")

    def lmforge(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lmforge.cli", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # Once in a full-suite run (many Rays started before it), the new head's job agent never
    # registered ("No available agent to submit job" for 180 s): not an auth failure, so that
    # one condition gets a second head; any auth error fails at once.
    for attempt in range(2):
        gcs_port = next(p for p in range(18400, 19999) if not cluster.port_in_use("127.0.0.1", p))
        up = lmforge(
            "cluster", "up", "--num-cpus", "1", "--port", str(gcs_port),
            "--dashboard-port", str(free_port()), "--temp-dir", temp_dir,
            "--min-worker-port", "20002", "--max-worker-port", "29999",
        )  # fmt: skip
        try:
            assert up.returncode == 0, up.stderr
            assert (tmp_path / ".ray" / "auth_token").exists()  # the token is in the user's ~/.ray
            done = lmforge(
                "submit", "check", "-c", "jobs/configs/check-local.yaml", "--set", "name=clean"
            )
            assert "Missing authentication token" not in done.stdout + done.stderr
            if attempt == 0 and "No available agent" in done.stderr:
                continue
            assert done.returncode == 0, done.stdout + done.stderr
            assert "SUCCEEDED" in done.stdout
            break
        finally:
            down = lmforge("cluster", "down")
            assert down.returncode == 0 and cluster._processes_using(temp_dir) == []


def test_ports_inside_the_worker_range_are_refused_naming_the_range(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))  # no head recorded: `up` starts one
    temp_dir = str(tmp_path / "ray")
    code, _, err = cli("cluster", "up", "--port", "18400", "--temp-dir", temp_dir)
    assert code == 2 and err.count("\n") == 1
    assert "--port 18400 is inside Ray's worker port range 10002-19999" in err
    assert "--min-worker-port 18401 --max-worker-port 28398" in err
    assert "in use" not in err
    code, _, err = cli(
        "cluster", "up", "--dashboard-port", "20005", "--min-worker-port", "20000",
        "--max-worker-port", "29999", "--temp-dir", temp_dir,
    )  # fmt: skip
    assert (
        code == 2 and "--dashboard-port 20005 is inside Ray's worker port range 20000-29999" in err
    )
    code, _, err = cli("cluster", "up", "--min-worker-port", "30000", "--max-worker-port", "20000")
    assert code == 2 and "not a range of ports" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli("cluster", "up", "--port", port, "--temp-dir", temp_dir)
    assert code == 2 and f"--port {port}: something on this machine already listens there" in err
    assert cluster._processes_using(temp_dir) == []  # nothing was started
