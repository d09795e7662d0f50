"""What the serving benchmarks share: starting `lmforge serve` in a subprocess and waiting until
it answers."""

from __future__ import annotations

import subprocess
import time

import httpx2


def start_and_wait(
    cmd: list[str], env: dict[str, str], ready_url: str, timeout: float = 180
) -> subprocess.Popen:
    """Start the server `cmd` and return it once `ready_url` answers 200; a server that exits
    or stays unready for `timeout` seconds is a RuntimeError (and is stopped)."""
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx2.get(ready_url, timeout=1).status_code == 200:
                return server
        except httpx2.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}: {' '.join(cmd)}")
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"server did not become ready in {timeout:.0f} s: {' '.join(cmd)}")
