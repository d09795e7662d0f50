"""Shared fixtures. Tests never touch the user's ~/.ray or ~/.lmforge: both are redirected to a
temp dir for the whole session, before Ray is imported anywhere."""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="lmforge-tests-"))
os.environ["LMFORGE_HOME"] = str(_SESSION_HOME / "lmforge-home")
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_SESSION_HOME / "ray_auth_token")
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)
os.environ["LMFORGE_STRICT_MFU"] = "1"  # an MFU over 100% (a wrong peak) fails the test

REPO = Path(__file__).resolve().parent.parent


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port free on the loopback now (the tests' servers, Ray heads, gloo rendezvous),
    not one given before in this session. It is drawn from 30000 up to the kernel's
    ephemeral range: above Ray's worker ports (10002-19999, and 20002-29999 where test_cluster
    moves them), and not from the ephemeral range itself, where a port the kernel hands out
    (`bind(("", 0))`, a connection's local end) could go to one of the processes Ray starts
    before the test's server binds it (stop 27's CI: Serve's proxy "Failed to bind")."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    candidates = [p for p in range(30000, ephemeral_low) if p not in _PORTS_GIVEN]
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    with socket.socket() as s:  # a machine whose ephemeral range starts low
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHARED = REPO.parent / "shared"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray (token auth on) for every test that needs Ray in-process."""
    from lmforge.cluster.local import ensure_token

    ensure_token()
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a `ray start` head that happens to run here
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=500 * 2**20,
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def cli(capsys):
    """Run the lmforge CLI in-process: returns (exit code, stdout, stderr)."""
    from lmforge.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
