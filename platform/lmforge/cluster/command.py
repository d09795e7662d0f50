"""`lmforge cluster up|status|down` (a local Ray head) and `lmforge submit` (a stage as a Ray job)."""

from __future__ import annotations

import argparse

from lmforge import StageFailed
from lmforge.cluster.local import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_GCS_PORT,
    DEFAULT_MAX_WORKER_PORT,
    DEFAULT_MIN_WORKER_PORT,
    down,
    status,
    up,
)


def cluster_command(argv: list[str], prog: str) -> int:
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
    # the stage runner and the configs load here, not for `lmforge cluster`
    from lmforge.cluster.submit import submit
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
