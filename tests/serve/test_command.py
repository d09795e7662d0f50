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
