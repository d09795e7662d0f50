"""One stage run's tracking from start to finish, for the stage runner (`stage.run_stage`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from lmforge import storage
from lmforge.tracking import (
    Opening,
    Safe,
    Settings,
    Tracker,
    finishing,
    nested,
    open_run,
    run_params,
    say,
)
from lmforge.tracking.outputs import log_outputs


def cluster_params() -> dict[str, str]:
    """The Ray cluster the run had: nodes, CPUs, GPUs (nothing outside Ray)."""
    import ray

    if not ray.is_initialized():
        return {}
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "ray.nodes": str(len(nodes)),
        "ray.cpus": f"{resources.get('CPU', 0):g}",
        "ray.gpus": f"{resources.get('GPU', 0):g}",
    }


@contextlib.contextmanager
def stage_run(
    settings: Settings,
    runs_dir: str,
    run_dir: str,
    stage: str,
    name: str,
    config: dict[str, Any],
    config_hash: str,
    resume: bool,
    quiet: bool = False,
    defer: bool = False,
) -> Iterator[Tracker]:
    """Open (or continue) the run, log its params; the caller runs the stage and puts its
    summary in the yielded tracker's `summary`; then the outputs are logged and the run
    finished as FINISHED, FAILED (an error) or KILLED (Ctrl-C). `defer`: the stage trains in
    this process, and the run may open after its first step (`tracking.open_run`)."""
    # Opening fails the stage (a wrong URI is said before the run); after that, a tracker
    # error is one line and the stage's work goes on.
    opened = open_run(settings, runs_dir, run_dir, stage, name, resume, defer=defer)
    deferred, tracker = isinstance(opened, Opening), Safe(opened, say)
    with finishing(tracker):
        tracker.log_params(run_params(config, config_hash) | {"stage": stage})
        tracker.set_tags({"stage": stage, "run_name": name, "output": storage.absolute(run_dir)})
        if not quiet and not deferred and tracker.where():
            # Where the run is, with the stage's other progress lines (stdout); `say` is for
            # warnings, on stderr.
            print(f"[tracking] {tracker.where()}", flush=True)
        if not deferred:  # (a deferred run opens at the loop's first step, or when needed)
            tracker.close()  # the stage's workers may log to the run meanwhile
        with nested(opened):  # runs the stage opens nest under it
            yield tracker
        log_outputs(tracker, run_dir, tracker.summary)
        if not quiet and deferred and tracker.where():
            print(f"[tracking] {tracker.where()}", flush=True)


def add_cluster_params(tracker: Tracker) -> None:
    tracker.log_params(cluster_params())
