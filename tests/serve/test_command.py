"""`lmforge serve` before it serves: its checks, error lines and banner (no Ray started)."""

from __future__ import annotations

import socket
import subprocess

import pytest

from lmforge.serve.command import banner, serves_on_this_machine
from lmforge.serve.config import ServeArgs


@pytest.mark.parametrize("no_ray", [True, False])
def test_a_port_in_use_is_one_line_and_exit_2_before_the_banner(cli, artifact, no_ray):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = cli(
            "serve", "--model", artifact, "--port", port, *(["--no-ray"] if no_ray else [])
        )
    assert code == 2
    assert out == ""  # no "serving at ..." banner for a server that never serves
    assert err.count("\n") == 1
    assert f"cannot serve on 127.0.0.1:{port}: address already in use" in err
    assert "--port" in err


def serve_child_env() -> dict[str, str]:
    """The environment of an `lmforge serve` child: embedded Ray, not verbose, this checkout."""
    import os

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LMFORGE_VERBOSE")}
    env["PYTHONPATH"] = str(REPO / "platform")
    return env


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_port_taken_after_the_check_is_one_line_and_exit_2(artifact):
    """The port is free when checked, then taken before Serve's proxy binds it (a process Ray
    starts meanwhile may take it): one line, exit 2, no proxy traceback."""
    import sys

    child = (
        "import sys, lmforge.serve.command as c; c.check_port_free = lambda host, port: None; "
        "from lmforge.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = serve_child_env()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-c", child, "serve", "--model", artifact, "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=280,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"lmforge: error: cannot serve on 127.0.0.1:{port}: Serve's proxy could not bind it "
        "(taken while Ray started?); pick another port with --port N"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_the_banners_curl_line_sends_the_key_when_pasted_into_a_shell(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_TEST_BANNER_KEYS", "sk-1")
    args = ServeArgs(
        models=[{"name": "m", "artifact": "x"}], api_key_env="LMFORGE_TEST_BANNER_KEYS"
    )
    (curl,) = [line for line in banner(args).splitlines() if "curl" in line]
    command = curl.split("try: ", 1)[1]
    # `curl` replaced by printf: the shell's own expansion of the line, one argument a line.
    words = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + command.removeprefix("curl ")],
        env={"KEY": "sk-1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert words == ["http://127.0.0.1:8000/v1/models", "-H", "Authorization: Bearer sk-1"]
    no_keys = ServeArgs(models=[{"name": "m", "artifact": "x"}], api_key_env="LMFORGE_UNSET_ENV")
    assert "Authorization" not in banner(no_keys)


def test_set_errors_name_the_set_not_the_model(cli, artifact):
    code, _, err = cli("serve", "--model", artifact, "--set", "limits.max_n=abc")
    assert code == 2
    assert err.startswith("lmforge: error: --set: 'limits.max_n': Input should be a valid integer")


def test_the_port_is_checked_only_where_serve_will_listen(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert serves_on_this_machine(None)
    assert serves_on_this_machine("127.0.0.1:6379")
    assert serves_on_this_machine("ray://localhost:10001")
    assert not serves_on_this_machine("ray://head.example.com:10001")
    monkeypatch.setenv("RAY_ADDRESS", "http://10.1.2.3:8265")
    assert not serves_on_this_machine(None)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_serve_with_one_line_and_exit_0(artifact):
    """A pod's stop or `kill`: Serve shuts down, no stack dump, no Ray log lines on the console."""
    import signal
    import sys
    import time

    from tests.conftest import free_port

    port = free_port()
    env = serve_child_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "serve", "--model", artifact, "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline, seen = time.monotonic() + 400, []
        while not seen or not seen[-1].startswith("serving until"):
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:  # it ended (or hangs) before serving
                proc.kill()
                raise AssertionError("\n".join(seen) + proc.stderr.read()[-3000:])
            seen.append(line.rstrip("\n"))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = seen + out.splitlines()
    assert proc.returncode == 0, err[-3000:]
    assert lines[-1] == "lmforge serve: stopped", (out[-3000:], err[-3000:])
    assert "Traceback" not in err and "pid=" not in out + err, err[-3000:]
