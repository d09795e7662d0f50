"""A local Ray head (up / status / down), the Ray auth token, and connecting a driver to Ray.

`lmforge cluster up` starts a Ray head on this machine with token authentication on
(`RAY_AUTH_MODE=token`), advertising 127.0.0.1 with its dashboard bound there (unless
`--host` says otherwise), and records it in `$LMFORGE_HOME/cluster.json` (default
`~/.lmforge`). `connect` is how every stage's driver joins Ray: the given address, RAY_ADDRESS,
or an embedded local Ray (loopback only).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge import LmforgeError

DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_AGENT_PORT = 52365
# Ray's range for worker processes' gRPC ports; its other ports may not fall inside it.
DEFAULT_MIN_WORKER_PORT, DEFAULT_MAX_WORKER_PORT = 10002, 19999


def port_or_free(preferred: int) -> int:
    """`preferred` if nothing listens on it here, else a free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> str | None:
    """Why `port` on `host` cannot be listened on (e.g. "address already in use"), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As servers bind: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return (e.strerror or str(e)).lower()
    return None


def lmforge_home() -> Path:
    return Path(os.environ.get("LMFORGE_HOME", Path.home() / ".lmforge"))


def token_path() -> Path:
    """Where Ray reads the cluster token from (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def ensure_token() -> str:
    """The Ray auth token: RAY_AUTH_TOKEN, else the token file, generated (mode 0600) if missing.
    A token file that other users can read (or that another user owns) is refused: whoever
    reads it can run code on the cluster as its owner."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = token_path()
    if path.exists():
        check_token_file(path)
        if path.read_text().strip():
            return path.read_text().strip()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(32)  # the same 256-bit form as `ray get-auth-token --generate`
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    print(f"generated a Ray auth token in {path}", flush=True)
    return token


def check_token_file(path: Path) -> None:
    """Refuse a token file that is not private to this user (one line saying how to fix it)."""
    st = path.stat()
    if st.st_uid != os.getuid():
        raise LmforgeError(
            f"the Ray token file {path} belongs to another user (uid {st.st_uid}): a token "
            f"someone else can change is not yours; remove it (a new one is generated) or "
            "point RAY_AUTH_TOKEN_PATH at your own"
        )
    if st.st_mode & 0o077:
        raise LmforgeError(
            f"the Ray token file {path} is readable by other users (mode "
            f"{st.st_mode & 0o777:04o}), and whoever reads it can run code on your cluster: "
            f"`chmod 600 {path}`, and if others may have read it, remove it for a new token"
        )


@dataclass
class LocalCluster:
    address: str  # GCS address, host:port
    dashboard_url: str
    temp_dir: str
    token_path: str
    num_cpus: float | None

    @staticmethod
    def state_file() -> Path:
        return lmforge_home() / "cluster.json"

    @classmethod
    def load(cls) -> LocalCluster | None:
        try:
            return cls(**json.loads(cls.state_file().read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def save(self) -> None:
        self.state_file().parent.mkdir(parents=True, exist_ok=True)
        self.state_file().write_text(json.dumps(asdict(self), indent=2) + "\n")

    def is_alive(self) -> bool:
        return (
            dashboard_get(self.dashboard_url, "/api/version", token=read_token(self.token_path))
            is not None
        )


def read_token(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None


def dashboard_get(url: str, route: str, token: str | None, timeout: float = 3.0) -> dict | None:
    """GET a dashboard JSON route with the bearer token; None when nothing answers."""
    request = urllib.request.Request(url.rstrip("/") + route)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except (urllib.error.URLError, OSError, json.JSONDecodeError):
        return None


# Ray's single-machine mode (its default on macOS and Windows), off: the node advertises
# 127.0.0.1 and its GCS, raylet and agents listen there only. On Linux Ray otherwise advertises
# the machine's address and listens on every interface, even given --node-ip-address=127.0.0.1.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Make the Ray this process starts (an embedded one) listen on the loopback only, unless
    the environment says otherwise. Ray reads the switch when imported, hence the constant."""
    os.environ.setdefault(LOOPBACK_ENV, "0")
    if "ray" in sys.modules:
        from ray._common.utils import env_bool
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = env_bool(LOOPBACK_ENV, True)


def _ray_env(token_file: str, host: str = "127.0.0.1") -> dict[str, str]:
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=token_file,
        RAY_USAGE_STATS_ENABLED="0",
    )
    if host == "127.0.0.1":
        env[LOOPBACK_ENV] = "0"
    else:  # the single-machine mode would advertise 127.0.0.1 whatever --node-ip-address says
        env.pop(LOOPBACK_ENV, None)
    env.pop("RAY_ADDRESS", None)
    # Job entrypoints say `python ...`: make that this environment's python (the venv's).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def up(
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    port: int = DEFAULT_GCS_PORT,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    temp_dir: str | None = None,
    worker_ports: tuple[int, int] = (DEFAULT_MIN_WORKER_PORT, DEFAULT_MAX_WORKER_PORT),
    host: str = "127.0.0.1",
) -> LocalCluster:
    """Start a local Ray head with token auth, or return the one already running. `host` is the
    address it advertises and its dashboard listens on: the loopback unless workers on other
    machines must join."""
    current = LocalCluster.load()
    if current and current.is_alive():
        print(
            f"a local Ray head is already running at {current.address} (dashboard {current.dashboard_url})"
        )
        _print_how_to_use(current)
        return current
    host = _check_host(host)
    check_ports(port, dashboard_port, worker_ports, host)
    ensure_token()
    tokfile = str(token_path())
    # Ray's Unix sockets live under the temp dir, whose path must stay short (~107 bytes).
    temp_dir = temp_dir or os.path.join(tempfile.gettempdir(), f"lmforge-ray-{os.getuid()}")
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        f"--port={port}",
        f"--node-ip-address={host}",
        f"--dashboard-host={host}",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--min-worker-port={worker_ports[0]}",
        f"--max-worker-port={worker_ports[1]}",
        # The job agent's HTTP port: Ray's default unless another Ray on this machine holds it
        # (then jobs fail with "No available agent to submit job").
        f"--dashboard-agent-listen-port={port_or_free(DEFAULT_AGENT_PORT)}",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus:g}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus:g}")
    proc = subprocess.run(cmd, env=_ray_env(tokfile, host), capture_output=True, text=True)
    if proc.returncode != 0:
        _stop_processes(_processes_using(temp_dir))  # what started before the failure
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LmforgeError(
            f"`ray start --head` failed (exit {proc.returncode}): {tail[0]}; Ray's logs: {temp_dir}/session_latest/logs"
        )
    cluster = LocalCluster(
        f"{host}:{port}", f"http://{host}:{dashboard_port}", temp_dir, tokfile, num_cpus
    )
    deadline = time.monotonic() + 60
    while not cluster.is_alive():
        if time.monotonic() > deadline:
            raise LmforgeError(
                f"the Ray head started but its dashboard at {cluster.dashboard_url} did not answer within 60s; logs: {temp_dir}/session_latest/logs"
            )
        time.sleep(0.5)
    cluster.save()
    print(
        f"started a local Ray head (token auth on)\n  address:   {cluster.address}\n  dashboard: {cluster.dashboard_url}"
    )
    _print_how_to_use(cluster)
    return cluster


def _check_host(host: str) -> str:
    """`host` as an IPv4 address of this machine (Ray advertises it: 0.0.0.0 reaches nobody)."""
    import ipaddress

    why = "not an IPv4 address"
    try:
        address = ipaddress.IPv4Address(host)
        if address.is_unspecified:
            why = "not an address Ray can advertise"
        else:
            with socket.socket() as s:
                s.bind((str(address), 0))
            return str(address)
    except ValueError:
        pass
    except OSError:
        why = "not an address of this machine"
    raise LmforgeError(
        f"--host {host!r} is {why}; give 127.0.0.1 (the default: this machine only) or the "
        "IPv4 address other machines reach this one at"
    )


def check_ports(
    port: int, dashboard_port: int, worker_ports: tuple[int, int], host: str = "127.0.0.1"
) -> None:
    """Refuse, in one line each, the ports `ray start` would refuse or fail on obscurely."""
    low, high = worker_ports
    if not 1024 < low < high <= 65535:
        raise LmforgeError(
            f"worker port range {low}-{high} is not a range of ports: give --min-worker-port below --max-worker-port, both in 1025-65535"
        )
    for flag, value in (("--port", port), ("--dashboard-port", dashboard_port)):
        if low <= value <= high:
            span = high - low
            above = max(value, port, dashboard_port) + 1
            raise LmforgeError(
                f"{flag} {value} is inside Ray's worker port range {low}-{high} (one port per "
                f"worker process); pick a port outside it, or move the range, e.g. "
                f"--min-worker-port {above} --max-worker-port {min(above + span, 65535)}"
            )
        if port_in_use(host, value):
            raise LmforgeError(
                f"{flag} {value}: something on this machine already listens there (another Ray head? `lmforge cluster status`); pick a free port with {flag} N"
            )


def _print_how_to_use(cluster: LocalCluster) -> None:
    print(
        "submit a stage:\n"
        "  lmforge submit check -c CONFIG.yaml\n"
        "or with Ray's own CLI:\n"
        f"  export RAY_ADDRESS={cluster.dashboard_url} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path}\n"
        "  ray job submit --working-dir . -- python jobs/check.py -c CONFIG.yaml"
    )


def status() -> int:
    cluster = LocalCluster.load()
    if cluster is None or not cluster.is_alive():
        print("no local Ray head is running (start one with `lmforge cluster up`)")
        return 1
    token = read_token(cluster.token_path)
    nodes = dashboard_get(cluster.dashboard_url, "/nodes?view=summary", token=token) or {}
    summary = (nodes.get("data") or {}).get("summary") or []
    alive = [n for n in summary if (n.get("raylet") or {}).get("state") == "ALIVE"]
    print(
        f"local Ray head running\n  address:   {cluster.address}\n  dashboard: {cluster.dashboard_url}\n"
        f"  nodes:     {len(alive)} alive\n  temp dir:  {cluster.temp_dir}"
    )
    return 0


def down(grace_period: float = 10.0) -> int:
    """Stop the local head this tool started: like `ray stop` (SIGTERM, then SIGKILL after the
    grace period), but only the Ray processes of its temp dir, not other clusters here."""
    cluster = LocalCluster.load()
    if cluster is None:
        print("no local Ray head is recorded; nothing to stop")
        return 0
    stopped = _stop_processes(_processes_using(cluster.temp_dir), grace_period)
    LocalCluster.state_file().unlink(missing_ok=True)
    print(f"stopped the local Ray head at {cluster.address} ({stopped} processes)")
    return 0


def _stop_processes(pids: list[int], grace_period: float = 10.0) -> int:
    """SIGTERM `pids`, SIGKILL what is alive after the grace period; how many there were."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_period)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def _processes_using(temp_dir: str) -> list[int]:
    """Every process of the head whose temp dir is `temp_dir`: those whose command line names
    it, and all their descendants (Ray's workers rename themselves `ray::IDLE`, `ray::Actor`, so
    their command lines name nothing; a SIGTERM that reached only their parents left them)."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if temp_dir in cmdline and proc.info["pid"] != os.getpid():
            found.add(proc.info["pid"])
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update(child.pid for child in proc.children(recursive=True))
    found.discard(os.getpid())
    return sorted(found)


def use_token_auth(token_file: str) -> None:
    """Token auth for Ray clients of this process, with the token in `token_file`, unless the
    environment says otherwise. Ray reads the auth mode when it is imported, so this runs
    before `import ray` (or refreshes the config Ray read without it)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", token_file)
    if "ray" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def _is_loopback(address: str) -> bool:
    host = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}").hostname
    return host in ("127.0.0.1", "localhost")


def connect(address: str | None = None) -> None:
    """Connect this process to Ray: `address`, else RAY_ADDRESS, else start an embedded local
    Ray, with token auth (Ray generates the token if none exists), no dashboard, on the
    loopback only; inside a Ray job, RAY_ADDRESS points at the job's cluster."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    embedded = not target
    if embedded or _is_loopback(target):
        loopback_only()  # a driver of a loopback head is on 127.0.0.1 too, or finds no raylet
    if embedded and os.environ.get("RAY_AUTH_MODE", "token") == "token":
        ensure_token()  # its processes need the token at start
        use_token_auth(str(token_path()))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray

    from lmforge.console import quiet_ray_console, verbose

    # Our progress lines come from workers too: logs reach the driver, which filters them.
    options = {"log_to_driver": True, "logging_level": logging.INFO if verbose() else logging.ERROR}
    # Quiet from the start: in connect_in_background's thread Ray warns of its SIGTERM handler.
    logging.getLogger("ray").setLevel(options["logging_level"])
    if embedded:
        # address="local": a new instance even when a `ray start` head runs on this machine
        # (address=None would silently join that one).
        ray.init(address="local", include_dashboard=False, **options)
    else:
        ray.init(address=address or None, **options)
    quiet_ray_console()


def connect_in_background(address: str | None = None) -> Callable[[], None]:
    """`connect` in a thread (Ray starts while this one works on); returns the wait for it,
    which raises its error. The thread lives on: Ray's processes die with it (PDEATHSIG)."""
    import threading
    from concurrent.futures import Future

    started: Future = Future()  # connect's outcome

    def start() -> None:
        try:
            started.set_result(connect(address))
        except BaseException as e:  # raised by the wait, in the caller's thread
            started.set_exception(e)
        threading.Event().wait()

    threading.Thread(target=start, name="lmforge-ray", daemon=True).start()
    return started.result
