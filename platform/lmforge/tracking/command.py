"""`lmforge ui`: the MLflow UI on a runs directory's embedded store (or a tracking URI).

Logging needs only the MLflow client; the UI is MLflow's server, a separate install: its
`mlflow` package pins pyarrow below the version lmforge needs, so it runs from its own
environment (`uvx`, `pipx`, or an `mlflow` executable given with --mlflow).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys

from lmforge import LmforgeError
from lmforge.tracking.base import LOCAL_ARTIFACTS, LOCAL_DB


def store_args(runs_dir: str, uri: str | None) -> list[str]:
    """`mlflow server` arguments that open the store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return ["--backend-store-uri", uri]
    root = os.path.abspath(runs_dir)
    db = os.path.join(root, LOCAL_DB)
    if not os.path.exists(db):
        raise LmforgeError(
            f"no MLflow store in {root} (no {LOCAL_DB}): run a stage with that runs_dir first, "
            "or give --runs-dir / --uri"
        )
    artifacts = os.path.join(root, LOCAL_ARTIFACTS)
    return ["--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", artifacts]


def server_command(mlflow: str | None) -> list[str] | None:
    """How to start `mlflow server`: the given executable, this environment's full MLflow,
    or MLflow of the client's version run by uvx or pipx; None if none of them is here.
    LMFORGE_MLFLOW names an executable when none is given (`make test` installs one with
    scripts/install_mlflow_ui.sh)."""
    if mlflow:
        return [mlflow, "server"]
    installed = os.environ.get("LMFORGE_MLFLOW")
    if installed and os.access(installed, os.X_OK):
        return [installed, "server"]
    if importlib.util.find_spec("mlflow") and _has_ui():
        return [sys.executable, "-m", "mlflow", "server"]
    spec = f"mlflow=={client_version()}"
    if shutil.which("uvx"):
        return ["uvx", "--from", spec, "mlflow", "server"]
    if shutil.which("pipx"):
        return ["pipx", "run", "--spec", spec, "mlflow", "server"]
    return None


def _has_ui() -> bool:
    """The full `mlflow` package ships the UI's build; `mlflow-skinny` does not."""
    spec = importlib.util.find_spec("mlflow")
    root = os.path.dirname(spec.origin) if spec and spec.origin else ""
    return os.path.isdir(os.path.join(root, "server", "js", "build"))


def client_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("mlflow-skinny", "mlflow"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "3.17.2"


def ui_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Open the MLflow UI on the runs' experiment tracking store: every stage run "
        "with its params, metric curves and artifacts (docs/tracking.md).",
    )
    parser.add_argument(
        "--runs-dir",
        default="runs",
        help="the runs_dir whose embedded store (mlflow.db) to open (default: %(default)s)",
    )
    parser.add_argument("--uri", help="a tracking URI instead (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="port (default %(default)s)")
    parser.add_argument("--mlflow", metavar="PATH", help="an `mlflow` executable to run")
    parser.add_argument(
        "--print", action="store_true", help="print the server command instead of running it"
    )
    args = parser.parse_args(argv)
    store = store_args(args.runs_dir, args.uri)
    listen = ["--host", args.host, "--port", str(args.port)]
    server = server_command(args.mlflow)
    if server is None:
        spec = f"mlflow=={client_version()}"
        raise LmforgeError(
            "the MLflow UI server is not installed (lmforge logs with mlflow-skinny, which has "
            f"no UI): install uv or pipx, or `python -m venv ~/.mlflow-ui && ~/.mlflow-ui/bin/pip "
            f"install '{spec}'` and run `lmforge ui --mlflow ~/.mlflow-ui/bin/mlflow`"
        )
    command = [*server, *store, *listen]
    if args.print:
        print(" ".join(command))
        return 0
    print(f"MLflow UI at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
