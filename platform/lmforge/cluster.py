"""Local Ray clusters (up / status / down), connecting drivers, and submitting stages as Ray jobs.

`lmforge cluster up` starts a Ray head on this machine with token authentication on
(`RAY_AUTH_MODE=token`), advertising 127.0.0.1 with its dashboard bound there (unless
`--host` says otherwise), and records it in
`$LMFORGE_HOME/cluster.json` (default `~/.lmforge`). `lmforge submit` sends a stage's
`jobs/<stage>.py` to any Ray cluster through the Ray Jobs SDK, streams its logs and exits with
the job's status: exactly what `ray job submit` or a KubeRay RayJob runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge import ConfigError, LmforgeError, StageFailed, storage

DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_AGENT_PORT = 52365
# Ray's range for worker processes' gRPC ports; its other ports may not fall inside it.
DEFAULT_MIN_WORKER_PORT, DEFAULT_MAX_WORKER_PORT = 10002, 19999


def port_or_free(preferred: int) -> int:
    """`preferred` if nothing listens on it here, else a free port."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> str | None:
    """Why `port` on `host` cannot be listened on (e.g. "address already in use"), or None."""
    import socket

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
    import socket

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
    nodes = (
        dashboard_get(
            cluster.dashboard_url, "/nodes?view=summary", token=read_token(cluster.token_path)
        )
        or {}
    )
    summary = (nodes.get("data") or {}).get("summary") or []
    alive = [n for n in summary if (n.get("raylet") or {}).get("state") == "ALIVE"]
    print(
        f"local Ray head running\n  address:   {cluster.address}\n  dashboard: {cluster.dashboard_url}\n"
        f"  nodes:     {len(alive)} alive\n  temp dir:  {cluster.temp_dir}"
    )
    return 0


def down(grace_period: float = 10.0) -> int:
    """Stop the local head this tool started: only the Ray processes of its temp dir.

    Like `ray stop`: SIGTERM, then SIGKILL what is still alive after the grace period. Unlike
    `ray stop`, other Ray clusters on this machine are left alone.
    """
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
    import urllib.parse

    host = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}").hostname
    return host in ("127.0.0.1", "localhost")


def connect(address: str | None = None) -> None:
    """Connect this process to Ray: `address`, else RAY_ADDRESS, else start an embedded local Ray.

    An embedded local Ray gets token auth too (Ray generates the token if none exists), no
    dashboard, and listens on the loopback only; inside a Ray job, RAY_ADDRESS points at the
    job's cluster.
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    embedded = not target
    if embedded or _is_loopback(target):
        # A driver of a loopback head must see itself on 127.0.0.1 too, or Ray finds no raylet
        # of its own address to join.
        loopback_only()
    if embedded and os.environ.get("RAY_AUTH_MODE", "token") == "token":
        ensure_token()  # its processes need the token at start
        use_token_auth(str(token_path()))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray

    from lmforge.console import quiet_ray_console, verbose

    # Our progress lines come from workers too: logs reach the driver, which filters them.
    options = {"log_to_driver": True, "logging_level": logging.INFO if verbose() else logging.ERROR}
    if embedded:
        # address="local": a new instance even when a `ray start` head runs on this machine
        # (address=None would silently join that one).
        ray.init(address="local", include_dashboard=False, **options)
    else:
        ray.init(address=address or None, **options)
    quiet_ray_console()


# ---------------------------------------------------------------- job submission


def submit(
    stage_name: str,
    config: str | None,
    overrides: list[str],
    address: str | None,
    working_dir: str = ".",
    wait: bool = True,
) -> int:
    """Submit `jobs/<stage>.py` as a Ray job; stream its logs; return 0 if it succeeded."""
    from lmforge.config import load_config
    from lmforge.jobfiles import job_runtime_env
    from lmforge.stage import get_stage

    stage = get_stage(stage_name)
    wd = Path(working_dir).resolve()
    entry = wd / stage.job_script
    if not entry.exists():
        raise LmforgeError(
            f"{entry} not found: --working-dir must be an lmforge checkout or a project with {stage.job_script}"
        )
    cfg = load_config(stage.config_cls, config, overrides)  # validate before spending
    if stage.cacheable:  # a check's report is its log; other stages' outputs are the point
        refuse_relative_runs_dir(cfg.runs_dir)
    args = [stage.job_script]
    if config:
        cfg_path = Path(config).resolve()
        if not cfg_path.is_relative_to(wd):
            raise LmforgeError(
                f"config {config} is outside the working dir {wd} that is shipped to the cluster; move it under {wd} or pass --working-dir"
            )
        args += ["-c", str(cfg_path.relative_to(wd))]
    for o in overrides:
        args += ["--set", o]
    entrypoint = "python " + shlex.join(args)
    client = _job_client(address)
    runtime_env = job_runtime_env(wd)  # no build outputs, no secrets
    job_id = _submit_with_retry(client, entrypoint, runtime_env)
    print(f"submitted job {job_id}: {entrypoint}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --follow {job_id}")
        return 0
    _stream_logs(client, job_id)
    final = _wait_final(client, job_id)
    info = client.get_job_info(job_id)
    print(
        f"job {job_id} {final}"
        + (f": {info.message}" if final != "SUCCEEDED" and info.message else ""),
        flush=True,
    )
    return 0 if final == "SUCCEEDED" else 1


def refuse_relative_runs_dir(runs_dir: str) -> None:
    """A Ray job runs in a temporary copy of the working dir: a relative runs_dir would write
    its outputs there, and they vanish with it."""
    if not storage.is_uri(runs_dir) and not os.path.isabs(os.path.expanduser(runs_dir)):
        raise ConfigError(
            f"runs_dir {runs_dir!r} is relative: a submitted job runs in a temporary copy of the "
            "working dir, so its outputs would vanish with it; give an absolute path on storage "
            "every Ray node sees, or a URI (e.g. --set runs_dir=/mnt/lmforge/runs)"
        )


def _submit_with_retry(client, entrypoint: str, runtime_env: dict, timeout: float = 180.0) -> str:
    """Submit, retrying while a just-started head has no job agent yet (as KubeRay's submitter does)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _job_client(address: str | None):
    local = LocalCluster.load()
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and local and local.is_alive():
        address = local.dashboard_url
    if not address:
        raise LmforgeError(
            "no Ray cluster to submit to: pass --address URL, set RAY_ADDRESS, or start one with `lmforge cluster up`"
        )
    if local and address.rstrip("/") == local.dashboard_url:
        use_token_auth(local.token_path)  # the head `cluster up` started wants its token
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # the SDK raises plain RuntimeError/ConnectionError with long texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            "; the cluster wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)"
            if "401" in str(e) or "uthenticat" in str(e)
            else ""
        )
        raise LmforgeError(f"cannot reach the Ray cluster at {address}: {first}{hint}") from None


def _stream_logs(client, job_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def _wait_final(client, job_id: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


# ---------------------------------------------------------------- command line


def cluster_command(argv: list[str], prog: str) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Start, inspect and stop a local Ray head (token auth on, dashboard on 127.0.0.1).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="start a local Ray head (no-op if one is running)")
    p_up.add_argument("--num-cpus", type=float, help="CPUs the head offers (default: all)")
    p_up.add_argument("--num-gpus", type=float, help="GPUs the head offers (default: all detected)")
    p_up.add_argument(
        "--port", type=int, default=DEFAULT_GCS_PORT, help="GCS port (default %(default)s)"
    )
    p_up.add_argument(
        "--dashboard-port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        help="dashboard / jobs API port (default %(default)s)",
    )
    p_up.add_argument(
        "--min-worker-port",
        type=int,
        default=DEFAULT_MIN_WORKER_PORT,
        help="lowest port of worker processes (default %(default)s); --port and --dashboard-port must lie outside the range",
    )
    p_up.add_argument(
        "--max-worker-port",
        type=int,
        default=DEFAULT_MAX_WORKER_PORT,
        help="highest port of worker processes (default %(default)s)",
    )
    p_up.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the head advertises and its dashboard listens on (default %(default)s: "
        "this machine only); this machine's IP lets workers on other machines join",
    )
    p_up.add_argument(
        "--temp-dir",
        help="Ray's session and log dir (default: a short path under the system temp dir)",
    )
    sub.add_parser("status", help="show the local head's address, dashboard and nodes")
    sub.add_parser("down", help="stop the local head started by `cluster up`")
    args = parser.parse_args(argv)
    if args.action == "up":
        workers = (args.min_worker_port, args.max_worker_port)
        up(
            args.num_cpus,
            args.num_gpus,
            args.port,
            args.dashboard_port,
            args.temp_dir,
            workers,
            args.host,
        )
        return 0
    return status() if args.action == "status" else down()


def submit_command(argv: list[str], prog: str) -> int:
    import argparse

    from lmforge.stage import add_config_arguments

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Submit a stage (jobs/<stage>.py) to a Ray cluster as a Ray job, stream its logs, and exit with its status. "
        "Equivalent to: ray job submit --working-dir . -- python jobs/<stage>.py -c CONFIG",
    )
    parser.add_argument("stage", help="stage name, e.g. check")
    add_config_arguments(parser)
    parser.add_argument(
        "--address",
        help="Ray dashboard URL (default: RAY_ADDRESS, else the `lmforge cluster up` head)",
    )
    parser.add_argument(
        "--working-dir",
        default=".",
        help="directory shipped to the cluster (default: .; .venv, runs and .git are left out)",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="return after submitting instead of following the logs",
    )
    args = parser.parse_args(argv)
    code = submit(
        args.stage,
        args.config,
        args.overrides,
        args.address,
        args.working_dir,
        wait=not args.no_wait,
    )
    if code != 0:
        raise StageFailed(f"the {args.stage} job did not succeed (see its logs above)")
    return 0
