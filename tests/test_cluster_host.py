"""`cluster up --host`: the head advertises the loopback (and its dashboard listens there) unless
another address is asked for; what is not an IPv4 address is refused before Ray starts."""

from __future__ import annotations

import socket
import subprocess

import pytest

from lmforge import LmforgeError
from lmforge.cluster import local as cluster


@pytest.fixture
def started(tmp_path, monkeypatch):
    """The `ray start` command `up` runs (made to fail, so nothing starts)."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    commands = Commands()

    def run(cmd, **kwargs):
        commands.append(cmd)
        commands.envs.append(kwargs["env"])
        return subprocess.CompletedProcess(cmd, 1, "", "stopped by the test")

    monkeypatch.setattr(cluster.subprocess, "run", run)
    return commands


class Commands(list):
    envs: list[dict[str, str]]

    def __init__(self) -> None:
        super().__init__()
        self.envs = []


def flags(cmd: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in cmd if a.startswith("--") and "=" in a)


def test_the_head_is_on_the_loopback_by_default(started, tmp_path):
    with pytest.raises(LmforgeError, match="ray start --head` failed"):
        cluster.up(port=39001, dashboard_port=39002, temp_dir=str(tmp_path / "ray"))
    (cmd,) = started
    assert flags(cmd)["node-ip-address"] == "127.0.0.1"
    assert flags(cmd)["dashboard-host"] == "127.0.0.1"
    assert started.envs[0][cluster.LOOPBACK_ENV] == "0"  # else Ray listens everywhere anyway


def this_machines_address() -> str:
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    pytest.skip("this machine has no IPv4 address but the loopback")


def test_another_address_is_asked_for(started, tmp_path):
    ip = this_machines_address()
    with pytest.raises(LmforgeError, match="ray start --head` failed"):
        cluster.up(port=39001, dashboard_port=39002, temp_dir=str(tmp_path / "ray"), host=ip)
    (cmd,) = started
    assert flags(cmd)["node-ip-address"] == flags(cmd)["dashboard-host"] == ip
    assert cluster.LOOPBACK_ENV not in started.envs[0]


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("my-laptop", "not an IPv4 address"),
        ("::1", "not an IPv4 address"),
        ("0.0.0.0", "not an address Ray can advertise"),
        ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1: nobody's
    ],
)
def test_what_is_not_an_address_of_this_machine_is_refused(started, host, why):
    with pytest.raises(LmforgeError, match=f"--host '{host}' is {why}"):
        cluster.up(host=host)
    assert started == []  # before Ray starts
