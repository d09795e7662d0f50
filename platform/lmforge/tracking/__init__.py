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
_PARENT: dict[str, Any] | None = None


def open_run(
    settings: Settings,
    runs_dir: str,
    run_dir: str,
    stage: str,
    name: str,
    resume: bool,
) -> Tracker:
    """The tracker of one stage run. `resume`: continue the run recorded in the run dir's
    tracking.json (a retry of an incomplete output) when it was made by the same backend and
    store; otherwise a new run (nested under the pipeline's parent run, if any)."""
    cls = load_backend(settings.backend)
    if cls is Tracker:
        return Tracker()
    previous = read_info(run_dir) if resume else None
    parent = _PARENT if _PARENT and _PARENT.get("backend") == settings.backend else None
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
    once through `say` and replaced by the no-op: tracking never stops a training run."""
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
    tracking client is imported and the run reopened."""
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
        _PARENT = tracker.info
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
