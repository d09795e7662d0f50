"""Experiment tracking: one run per stage run in MLflow (the default), W&B or TensorBoard.

Every backend is a `Tracker` (`log_params`, `log_metrics(step=...)`, `set_tags`,
`log_artifact`, `finish(status)`); `Tracker` itself is the no-op of `backend: none`. The
stage runner opens the run (`open_run`) and writes what reopens it to `<run dir>/tracking.json`,
so a training worker's rank 0 logs into the same run (`reopen`) and a retried or resumed run
continues it instead of starting another. A pipeline opens a parent run (`parent_run`) and
its stage runs nest under it.

No backend is imported until a run is opened: the training loop imports this package and must
stay importable without Ray, pydantic or a tracking client.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

from lmforge import ConfigError, LmforgeError, storage
from lmforge.tracking.base import (
    BACKENDS,
    LOCAL_ARTIFACTS,
    LOCAL_DB,
    TRACKING_FILE,
    NoStore,
    Opening,
    Safe,
    Settings,
    Tracker,
    flatten,
    local_copy,
    numeric,
    param_text,
    say,
)

__all__ = [
    "BACKENDS",
    "LOCAL_ARTIFACTS",
    "LOCAL_DB",
    "TRACKING_FILE",
    "Safe",
    "Settings",
    "Tracker",
    "first_step_done",
    "flatten",
    "local_copy",
    "numeric",
    "Opening",
    "open_run",
    "param_text",
    "parent_run",
    "reopen",
    "reopen_in_background",
    "run_params",
    "say",
]


def load_backend(backend: str) -> type[Tracker]:
    if backend == "mlflow":
        from lmforge.tracking.mlflow_backend import MlflowTracker

        return MlflowTracker
    if backend == "wandb":
        from lmforge.tracking.wandb_backend import WandbTracker

        return WandbTracker
    if backend == "tensorboard":
        from lmforge.tracking.tensorboard_backend import TensorboardTracker

        return TensorboardTracker
    if backend == "none":
        return Tracker
    raise ConfigError(f"tracking.backend {backend!r}: use one of {', '.join(BACKENDS)}")


# The pipeline's parent run while its stages run (set by `parent_run`).
_PARENT: Tracker | None = None
# The stage run that opens once this process's training loop has taken its first step
# (`open_run(defer=True)`), and the event the loop sets then (`first_step_done`).
_DEFERRED: Opening | None = None
_FIRST_STEP = threading.Event()


def first_step_done() -> None:
    """The training loop's first step is done: a deferred stage run opens now, while the loop
    goes on (importing mlflow and opening its store take ~2.5 s on 2 cores, which would
    otherwise come before the first step of in-process training)."""
    _FIRST_STEP.set()


def open_run(
    settings: Settings,
    runs_dir: str,
    run_dir: str,
    stage: str,
    name: str,
    resume: bool,
    defer: bool = False,
) -> Tracker:
    """The tracker of one stage run. `resume`: continue the run recorded in the run dir's
    tracking.json (a retry of an incomplete output) when it was made by the same backend and
    store; otherwise a new run (nested under the pipeline's parent run, if any). `defer`: open
    it after this process's first training step (`first_step_done`), when nothing about the
    store can be wrong (MLflow's embedded store under a local runs_dir; any other store is
    opened now, so a wrong URI is one line before the run)."""
    global _DEFERRED
    cls = load_backend(settings.backend)
    if cls is Tracker:
        return Tracker()
    parent = _parent_info(settings.backend)
    args = (cls, settings, runs_dir, run_dir, stage, name, resume, parent)
    embedded = not (settings.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if defer and settings.backend == "mlflow" and embedded and storage.is_local(runs_dir):
        _FIRST_STEP.clear()
        _DEFERRED = Opening(lambda: _open_or_say(*args), {"backend": settings.backend}, _FIRST_STEP)
        return _DEFERRED
    return _open_run(*args)


def _open_run(cls, settings, runs_dir, run_dir, stage, name, resume, parent) -> Tracker:
    previous = read_info(run_dir) if resume else None
    tracker = _open(
        cls,
        settings,
        runs_dir=runs_dir,
        run_name=f"{stage}/{os.path.basename(run_dir.rstrip('/'))}",
        default_experiment=(parent or {}).get("experiment") or stage,
        previous=previous,
        parent=parent,
    )
    if tracker.backend != "none":
        storage.write_json(storage.join(run_dir, TRACKING_FILE), tracker.info)
    return tracker


def _pending() -> Opening | None:
    """This process's deferred stage run while it is still to open, else None."""
    return _DEFERRED if _DEFERRED is not None and _DEFERRED.thread.is_alive() else None


def _parent_info(backend: str) -> dict[str, Any] | None:
    """What a run opened now nests under: the enclosing run of the same backend (opened now
    if it was deferred), or None."""
    if _PARENT is None or _PARENT.backend != backend:
        return None
    if isinstance(_PARENT, Opening):
        _PARENT.join()
    return _PARENT.info if _PARENT.info.get("run_id") else None


def _open_or_say(*args: Any) -> Tracker:
    """A deferred run's opening: a failure is one line, and training goes on untracked."""
    try:
        return _open_run(*args)
    except Exception as e:
        say(f"tracking off: cannot open the run: {type(e).__name__}: {e}")
        return Tracker()


def _open(cls: type[Tracker], settings: Settings, **kwargs: Any) -> Tracker:
    try:
        return cls.open(settings, **kwargs)
    except NoStore as e:
        say(str(e))
        return Tracker()
    except LmforgeError:
        raise
    except Exception as e:  # a client that cannot reach its store: say which, before the run
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"tracking ({settings.backend}): cannot open a run: {type(e).__name__}: {first}; "
            "fix tracking.uri / the backend's settings, or --set tracking.backend=none"
        ) from None


def read_info(run_dir: str) -> dict[str, Any] | None:
    path = storage.join(run_dir, TRACKING_FILE)
    try:
        return storage.read_json(path) if storage.exists(path) else None
    except (OSError, ValueError):
        return None


def reopen(run_dir: str, say=None) -> Tracker:
    """The run the stage runner opened for `run_dir` (a training worker's rank 0), or a no-op
    when there is none (a bare `run_local`). A tracker that cannot be reopened is reported
    once through `say` and replaced by the no-op: tracking never stops a training run. A
    deferred stage run of this process (`open_run(defer=True)`) is opened first."""
    if (deferred := _pending()) is not None:
        deferred.join()
    info = read_info(run_dir)
    if not info or info.get("backend", "none") == "none":
        return Tracker()
    try:
        return Safe(load_backend(info["backend"]).reopen(info), say)
    except Exception as e:
        if say:
            say(f"tracking off for this worker: cannot reopen the {info['backend']} run: {e}")
        return Tracker()


def reopen_in_background(run_dir: str, say=None) -> Tracker:
    """`reopen` in a background thread (`Opening`): the training loop starts while the
    tracking client is imported and the run reopened (once this process's deferred stage run
    is open, when it has one: in-process training)."""
    if (deferred := _pending()) is not None:
        return Opening(
            lambda: (deferred.join(), reopen(run_dir, say))[1], deferred.info, _FIRST_STEP
        )
    info = read_info(run_dir)
    if not info or info.get("backend", "none") == "none":
        return Tracker()
    return Opening(lambda: reopen(run_dir, say), info)


@contextlib.contextmanager
def parent_run(settings: Settings, runs_dir: str, name: str, params: dict[str, Any]) -> Iterator:
    """A pipeline's parent run: its stage runs (opened inside) nest under it."""
    cls = load_backend(settings.backend)
    if cls is Tracker:
        yield Tracker()
        return
    tracker = _open(
        cls,
        settings,
        runs_dir=runs_dir,
        run_name=f"pipeline/{name}",
        default_experiment=name,
        previous=None,
        parent=None,
    )
    tracker.log_params(params)
    with finishing(tracker), nested(tracker):
        yield tracker


@contextlib.contextmanager
def finishing(tracker: Tracker) -> Iterator[None]:
    """Finish the run as the block ends: FINISHED, FAILED (an error) or KILLED (Ctrl-C)."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


@contextlib.contextmanager
def nested(tracker: Tracker) -> Iterator[None]:
    """Runs opened inside nest under `tracker`'s run: a pipeline's stage runs, and the runs a
    stage starts itself (improve's fine-tune and evals)."""
    global _PARENT
    before = _PARENT
    if tracker.backend != "none":
        _PARENT = tracker
    try:
        yield
    finally:
        _PARENT = before


# ---------------------------------------------------------------- what a run logs


def run_params(config: dict[str, Any], config_hash: str) -> dict[str, str]:
    """A stage run's params: the resolved config flattened, its hash, lmforge's version and
    the git commit of the working directory (when it is a checkout)."""
    from lmforge import __version__

    params = {k: param_text(v) for k, v in flatten(config).items()}
    params.update({"config_hash": config_hash, "lmforge_version": __version__})
    commit = git_commit()
    if commit:
        params["git_commit"] = commit
    return params


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
