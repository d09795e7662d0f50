"""`lmforge serve`: run the serving app locally (Ray Serve, or plain uvicorn with --no-ray)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
import urllib.parse

from lmforge import ConfigError, storage
from lmforge.config import apply_overrides, build_config, fields_help, read_yaml
from lmforge.serve.config import ServeArgs


def load_serve_args(path: str | None, overrides: list[str], model: str | None) -> ServeArgs:
    """ServeArgs from a YAML file (plain ServeArgs, or a Serve config file's lmforge app), or
    from --model for the one-model case; --set overrides apply to either."""
    if path and model:
        raise ConfigError("give either -c CONFIG or --model ARTIFACT_DIR, not both")
    if path:
        data = read_yaml(path)
        if "applications" in data:  # a Serve config file, e.g. jobs/serve_config.yaml
            apps = [
                a for a in data["applications"] if "lmforge.serve.app" in a.get("import_path", "")
            ]
            if not apps:
                raise ConfigError(f"{path}: no application imports lmforge.serve.app:build_app")
            data = apps[0].get("args") or {}
    elif model:
        data = {"models": [{"name": "lmforge", "artifact": model}]}
    else:
        raise ConfigError("nothing to serve: give -c CONFIG or --model ARTIFACT_DIR")
    data = apply_overrides(ServeArgs, data, overrides)
    # Without a file, --model alone always validates: a problem is in a --set (or --port ...).
    return build_config(ServeArgs, data, source=path or "--set")


def serve_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve model artifacts behind an OpenAI-compatible API with continuous "
        "batching (Ray Serve; see docs/serving.md).",
        epilog="config fields (in the YAML file, or with --set KEY=VALUE):\n"
        + fields_help(ServeArgs),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", help="ServeArgs YAML, or a Serve config file")
    parser.add_argument("--model", help="serve one artifact dir (or training run dir) as 'lmforge'")
    parser.add_argument("--name", help="model name clients send (with --model)")
    parser.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--api-key-file", help="file of API keys, one per line")
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host with no API keys (anyone who reaches it can use it)",
    )
    parser.add_argument("--max-batch-size", type=int, help="every model's max batch (1: off)")
    parser.add_argument("--max-waiting", type=int, help="every model's waiting-queue limit")
    parser.add_argument("--device", help="every model's device: auto, cpu, cuda")
    parser.add_argument("--torch-threads", type=int, help="every model's torch CPU threads")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a ServeArgs key"
    )
    parser.add_argument("--address", help="Ray address (default RAY_ADDRESS or embedded)")
    parser.add_argument("--no-ray", action="store_true", help="one process, uvicorn, no Ray")
    ns = parser.parse_args(argv)
    overrides = list(ns.set)
    for key, value in (("host", ns.host), ("port", ns.port), ("api_key_file", ns.api_key_file)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if ns.insecure_no_auth:
        overrides.append("insecure_no_auth=true")
    args = load_serve_args(ns.config, overrides, ns.model)
    if ns.name:
        if len(args.models) != 1:
            raise ConfigError("--name needs exactly one model")
        args.models[0].name = ns.name
    for field in ("max_batch_size", "max_waiting", "device", "torch_threads"):
        value = getattr(ns, field)
        for m in args.models if value is not None else []:
            setattr(m, field, value)  # validated on assignment (StrictModel)
    check_artifacts(args)
    args.check_auth()  # no key, or an empty key source, is an error now, not in a replica
    if ns.no_ray or serves_on_this_machine(ns.address):
        check_port_free(args.host, args.port)
    print(banner(args), flush=True)
    if ns.no_ray:
        import uvicorn

        from lmforge.serve.openai import local_app

        uvicorn.run(local_app(args), host=args.host, port=args.port, log_level="info")
        return 0
    return run_on_ray(args, ns.address)


def run_on_ray(args: ServeArgs, address: str | None) -> int:
    """Deploy the app on Ray Serve (embedded, or the cluster at `address`) until stopped."""
    from lmforge.cluster.local import connect

    connect(address)
    stop_on_signals()  # after connect: replaces the SIGTERM handlers Ray just installed
    from ray import serve

    from lmforge.console import quiet_loggers
    from lmforge.serve.app import application

    quiet_loggers("ray.serve")  # "Started Serve ...", "Application ... is ready" (-v shows them)
    try:
        start_serve(args)
        serve.run(application(args), name="lmforge", route_prefix=args.route_prefix)
        print("serving until Ctrl-C or SIGTERM", flush=True)
        while True:
            time.sleep(3600)
    except Stopped:
        pass
    finally:
        serve.shutdown()
    print("lmforge serve: stopped", flush=True)
    return 0


def start_serve(args: ServeArgs) -> None:
    """Serve's controller and HTTP proxy on `args.host:args.port`. A port taken after
    `check_port_free` (by a process Ray started meanwhile, or another server) is one line."""
    from ray import serve
    from ray.exceptions import RayTaskError

    try:
        serve.start(http_options={"host": args.host, "port": args.port})
    except RayTaskError as e:
        if "Failed to bind to address" not in str(e):
            raise
        raise ConfigError(
            f"cannot serve on {args.host}:{args.port}: Serve's proxy could not bind it (taken "
            "while Ray started?); pick another port with --port N"
        ) from None


class Stopped(Exception):
    """Ctrl-C or SIGTERM: a normal stop of `lmforge serve`."""


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (a pod's stop, `kill`) raise Stopped once: Serve is shut down, no
    traceback, exit 0. This replaces the handlers Ray's driver installs (Python: exit 15
    mid-call; its core worker's: a stack dump and abort); a second signal while stopping
    does not interrupt the shutdown."""
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def banner(args: ServeArgs) -> str:
    """Where the API is and a curl line that works as printed (double quotes: $KEY expands)."""
    base = f"http://{args.host}:{args.port}"
    auth = ' -H "Authorization: Bearer $KEY"' if args.api_keys() else ""
    lines = [
        f"lmforge serve: models {', '.join(m.name for m in args.models)} at {base}/v1",
        f"  try: curl {base}/v1/models{auth}",
        f"  playground: {base}{args.route_prefix.rstrip('/')}/playground",
    ]
    if args.request_log.path:
        lines.append(f"  request log and feedback: {args.request_log.path}")
    return "\n".join(lines)


def serves_on_this_machine(address: str | None) -> bool:
    """Whether Serve's HTTP proxy will listen here: an embedded Ray, or a head on this host."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return True
    host = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}").hostname
    return host in ("127.0.0.1", "localhost", "::1", socket.gethostname())


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on, before Ray starts (else: ~100 lines of
    Serve proxy traceback ending in `Failed to bind`)."""
    from lmforge.cluster.local import port_in_use

    why = port_in_use(host, port)
    if why:
        raise ConfigError(
            f"cannot serve on {host}:{port}: {why} (another server?); pick another port with --port N"
        )


def check_artifacts(args: ServeArgs) -> None:
    """Every model's artifact resolves (before any Ray or GPU is requested), and is given to
    the replicas as a path they can use: they run in another working directory. A run
    reference stays one (a replica that starts later serves what it names then)."""
    from lmforge.model.artifact import resolve_artifact

    for m in args.models:
        resolve_artifact(m.artifact)
        runs_dir, at, ref = m.artifact.rpartition("@")
        if at and (not runs_dir or runs_dir.endswith("/")):
            m.artifact = storage.join(storage.absolute(runs_dir or "runs"), "@" + ref)
        else:
            m.artifact = storage.absolute(m.artifact)
