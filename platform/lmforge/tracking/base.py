"""What every tracking backend shares: the settings, the `Tracker` interface (and its no-op),
the wrapper that keeps a worker's tracking errors from stopping training, and the helpers that
turn configs and metrics into what a tracker takes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lmforge import storage

BACKENDS = ("mlflow", "wandb", "tensorboard", "none")
TRACKING_FILE = "tracking.json"
LOCAL_DB = "mlflow.db"  # the embedded MLflow store: <runs_dir>/mlflow.db ...
LOCAL_ARTIFACTS = "mlartifacts"  # ... and its artifacts under <runs_dir>/mlartifacts


class NoStore(Exception):
    """The backend has nowhere to write without settings (e.g. runs_dir on an object store):
    the run goes untracked, saying why, rather than failing."""


@dataclass(frozen=True)
class Settings:
    """The `tracking:` section of a stage config, as plain data (the loop has no pydantic)."""

    backend: str = "mlflow"
    uri: str | None = None
    experiment: str | None = None


class Tracker:
    """The interface every backend implements; this base class logs nothing (`backend: none`)."""

    backend = "none"

    def __init__(self, info: dict[str, Any] | None = None) -> None:
        self.info: dict[str, Any] = info or {"backend": self.backend}
        self.summary: dict[str, Any] = {}  # the stage's summary, logged when the run ends

    @property
    def run_id(self) -> str | None:
        return self.info.get("run_id")

    def log_params(self, params: dict[str, Any]) -> None:
        """Flat name -> value; a resumed run keeps the values it already has."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numbers only (see `numeric`); `step` is the optimizer step or another ordinal."""

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        """Copy a local file into the run's artifacts (under `folder`)."""

    def finish(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED."""

    def close(self) -> None:
        """This process is done with the run; the run goes on (another process, e.g. a
        training worker, logs next, and the stage runner finishes it)."""

    def where(self) -> str:
        """One line: how to look at the run."""
        return ""


class Wrapper(Tracker):
    """A tracker around another (`inner`): every call goes through `_call(method, *args)`."""

    inner: Tracker | None

    def _call(self, method: str, *args) -> None:
        raise NotImplementedError

    def log_params(self, params):
        self._call("log_params", params)

    def set_tags(self, tags):
        self._call("set_tags", tags)

    def log_metrics(self, metrics, step=None):
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path, folder=None):
        self._call("log_artifact", path, folder)

    def finish(self, status="FINISHED"):
        self._call("finish", status)

    def close(self):
        self._call("close")

    def where(self) -> str:
        return self.inner.where() if self.inner is not None else ""


class Safe(Wrapper):
    """Wraps a worker's tracker: the first error is reported and ends tracking, not training."""

    def __init__(self, inner: Tracker, say=None) -> None:
        super().__init__(inner.info)
        self.inner, self.say, self.backend = inner, say, inner.backend

    def _call(self, method: str, *args) -> None:
        if self.inner is None:
            return
        try:
            getattr(self.inner, method)(*args)
        except Exception as e:
            if self.say:
                self.say(f"tracking off: {self.backend} {method} failed: {type(e).__name__}: {e}")
            self.inner = None


class Opening(Wrapper):
    """A tracker that `make` opens in a background thread (importing a client such as mlflow
    takes seconds, which a training run's first step should not wait for), once `gate` is set
    when there is one (`tracking.first_step_done`). Params and tags queue in order while it
    opens; metrics, artifacts, finish and close wait for it (so a metric is in the store when
    the call returns, as with the tracker itself: a resumed attempt logs only the steps after
    those in metrics.jsonl), and open it now if its gate is still shut (a run that fails before
    its first step is still recorded)."""

    def __init__(
        self,
        make: Callable[[], Tracker],
        info: dict[str, Any],
        gate: threading.Event | None = None,
    ) -> None:
        super().__init__(info)
        self.backend = info.get("backend", "none")
        self.inner: Tracker | None = None
        self.waiting: list[tuple[str, tuple]] = []
        self.gate = gate
        self.thread = threading.Thread(target=self._open, args=(make,), daemon=True)
        self.thread.start()

    def _open(self, make: Callable[[], Tracker]) -> None:
        if self.gate is not None:
            self.gate.wait()
        try:
            self.inner = make()
            self.info = self.inner.info
        finally:
            self.inner = self.inner or Tracker()

    def join(self) -> None:
        """Until it is open (now, if its gate is shut)."""
        if self.gate is not None:
            self.gate.set()
        self.thread.join()

    def _call(self, method: str, *args, wait: bool = True) -> None:
        self.waiting.append((method, args))
        if wait or not self.thread.is_alive():
            self.join()
            calls, self.waiting = self.waiting, []
            for name, call_args in calls:
                getattr(self.inner, name)(*call_args)

    def log_params(self, params):  # queued: the first step does not wait for the store
        self._call("log_params", params, wait=False)

    def set_tags(self, tags):
        self._call("set_tags", tags, wait=False)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists are kept whole (as JSON)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value} if prefix else {}


def param_text(value: Any) -> str:
    """A param's value as the resolved config shows it (YAML scalars, JSON lists)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def numeric(metrics: dict[str, Any], skip: tuple[str, ...] = ("step", "time")) -> dict[str, float]:
    """The finite numbers of a metrics dict (bools, None, text and NaN left out)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k not in skip
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path of `path`: itself, or a temporary copy of an object-store file."""
    if storage.is_local(path):
        yield storage.local_path(path)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
        with open(local, "wb") as f:
            f.write(storage.read_bytes(path))
        yield local


def say(text: str) -> None:
    print(f"[tracking] {text}", file=sys.stderr, flush=True)
