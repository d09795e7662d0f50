"""`lmforge serve`: run the serving app locally (Ray Serve, or plain uvicorn with --no-ray)."""

from __future__ import annotations

import argparse

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
    return build_config(ServeArgs, data, source=path or "--model")


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
    args.api_keys()  # a missing key file is an error now, not in a replica
    base = f"http://{args.host}:{args.port}"
    print(f"lmforge serve: models {', '.join(m.name for m in args.models)} at {base}/v1")
    print(
        f"  try: curl {base}/v1/models"
        + ("" if not args.api_keys() else " -H 'Authorization: Bearer $KEY'")
    )
    print(f"  playground: {base}{args.route_prefix.rstrip('/')}/playground")
    if args.request_log.path:
        print(f"  request log and feedback: {args.request_log.path}")
    if ns.no_ray:
        import uvicorn

        from lmforge.serve.openai import local_app

        uvicorn.run(local_app(args), host=args.host, port=args.port, log_level="info")
        return 0
    from lmforge.cluster import connect

    connect(ns.address)
    from ray import serve

    from lmforge.serve.app import build_app

    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(build_app(args), name="lmforge", route_prefix=args.route_prefix, blocking=True)
    finally:
        serve.shutdown()
    return 0


def check_artifacts(args: ServeArgs) -> None:
    """Every model's artifact resolves (before any Ray or GPU is requested), and is given to
    the replicas as a path they can use: they run in another working directory. A run
    reference stays one (a replica that starts later serves what it names then)."""
    from lmforge.model.hf import resolve_artifact

    for m in args.models:
        resolve_artifact(m.artifact)
        runs_dir, at, ref = m.artifact.rpartition("@")
        if at and (not runs_dir or runs_dir.endswith("/")):
            m.artifact = storage.join(storage.absolute(runs_dir or "runs"), "@" + ref)
        else:
            m.artifact = storage.absolute(m.artifact)
