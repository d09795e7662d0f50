"""What reaches the console: our progress lines and summaries; Ray's own logs stay in its files.

Ray forwards every worker's stdout and stderr to the driver (`log_to_driver`): our progress
lines (`[train] step 10 ...`, printed by rank 0 of a Ray Train run) come that way, and so do
Ray Train's `Reporting training result N: TrainingReport(...)` dumps, Serve's INFO lines,
core-worker warnings and tracebacks of things that recovered, some of them arriving after the
run's summary. Unless verbose (`lmforge -v ...` or LMFORGE_VERBOSE=1), the driver prints only
the forwarded lines that are ours; every line is still in the session's log files
(`<temp dir>/session_latest/logs`, the dashboard). The same holds for the error messages Ray
publishes to drivers, printed with a `(raylet)` prefix (`Task ServeController.graceful_shutdown
failed ... will be retried` while Serve stops): a failure that matters reaches us as the
exception of the task or actor call that failed.
"""

from __future__ import annotations

import logging
import os
import re
import sys

VERBOSE_ENV = "LMFORGE_VERBOSE"
# Our progress lines from Ray workers: "[stage] text" (lowercase stage name).
OUR_LINE = re.compile(r"^\[[a-z][a-z0-9_-]*\] ")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose() -> None:
    """Verbose for this process and the Ray processes it starts (they inherit the variable)."""
    os.environ[VERBOSE_ENV] = "1"


def print_our_worker_lines(batch: dict) -> None:
    """A Ray log batch (`lines`, `is_err`, `pid`, ...): print only our progress lines."""
    sink = sys.stderr if batch.get("is_err") else sys.stdout
    for line in batch.get("lines") or []:
        if OUR_LINE.match(line):
            print(line, file=sink, flush=True)


def quiet_ray_console() -> None:
    """After `ray.init(log_to_driver=True)`: forward only our lines, and only errors of the
    driver's own `ray` loggers (e.g. `Found multiple active Ray instances`). No-op if verbose."""
    if verbose():
        return
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without the dispatcher: keep its default printing
        return
    # "ray_print_logs" is the handler ray.init(log_to_driver=True) registers.
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("lmforge_print_logs")
    dispatcher.add_handler("lmforge_print_logs", print_our_worker_lines)
    drop_raylet_messages()


def drop_raylet_messages() -> None:
    """Ray's driver prints the error messages published to it (`pid: "raylet"` batches) from
    a thread of its own, past the dispatcher, through `ray._private.worker.print_to_stdstream`;
    wrap that function so those batches are dropped. Idempotent."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    ray_print = ray_worker.print_to_stdstream
    if getattr(ray_print, "lmforge_quiet", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet" or verbose():
            ray_print(data, ignore_prefix)

    print_to_stdstream.lmforge_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def quiet_loggers(*names: str) -> None:
    """Errors only from these library loggers of the driver (their INFO lines say nothing is
    wrong); for those with their own console handler, such as `ray.serve`. No-op if verbose."""
    if not verbose():
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
