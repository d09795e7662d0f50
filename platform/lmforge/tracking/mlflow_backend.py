"""MLflow: the default backend. With no URI (and no MLFLOW_TRACKING_URI) runs go to an embedded
SQLite store, `<runs_dir>/mlflow.db`, with artifacts under `<runs_dir>/mlartifacts`: no server
to start, and `lmforge ui` opens it. Only the client (`mlflow-skinny`) is needed to log.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from lmforge import storage
from lmforge.tracking.base import (
    LOCAL_ARTIFACTS,
    LOCAL_DB,
    NoStore,
    Settings,
    Tracker,
    local_copy,
)

# MLflow's per-request limits (mlflow.utils.validation): params and metrics per log_batch.
MAX_PARAMS, MAX_METRICS, MAX_PARAM_CHARS = 100, 1000, 6000


def local_store(runs_dir: str) -> tuple[str, str] | None:
    """(tracking URI, artifact root) of the embedded store under a local runs_dir; None when
    runs_dir is on an object store (a SQLite file cannot live there)."""
    if not storage.is_local(runs_dir):
        return None
    root = os.path.abspath(storage.local_path(runs_dir))
    return f"sqlite:///{os.path.join(root, LOCAL_DB)}", os.path.join(root, LOCAL_ARTIFACTS)


def tracking_uri(settings: Settings, runs_dir: str) -> tuple[str, str | None]:
    """(URI, artifact root for new experiments or None: the server's): tracking.uri, else
    MLFLOW_TRACKING_URI, else the embedded store."""
    uri = settings.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    store = local_store(runs_dir)
    if store is None:
        raise NoStore(
            f"runs_dir {runs_dir} is not a local path, so there is no embedded MLflow store: "
            "this run is not tracked; set tracking.uri (or MLFLOW_TRACKING_URI) to a tracking "
            "server, or tracking.backend: none to silence this"
        )
    seed_store(store[0][len("sqlite:///") :])
    return store


def seed_store(db: str) -> None:
    """A new embedded store starts as a copy of an empty one cached per MLflow version:
    creating one runs every schema migration MLflow has (tens of seconds on a busy machine),
    once per cache instead of once per runs_dir."""
    if os.path.exists(db):
        return
    import shutil
    import tempfile

    from mlflow.version import VERSION

    os.makedirs(os.path.dirname(db), exist_ok=True)
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmforge"
    )
    template = os.path.join(cache, f"mlflow-{VERSION}.db")
    try:
        if not os.path.exists(template):
            os.makedirs(cache, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".db")
            os.close(fd)
            os.remove(tmp)
            client(f"sqlite:///{tmp}").search_experiments()  # runs the migrations
            os.replace(tmp, template)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(db), suffix=".db")
        os.close(fd)
        shutil.copyfile(template, tmp)
        os.chmod(tmp, storage.file_mode())  # mkstemp's 0600: as readable as the umask allows
        try:
            os.link(tmp, db)  # not over a store another process made meanwhile
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
    except OSError:  # no writable cache: MLflow creates the store itself
        return


def client(uri: str):
    # The store's schema migrations and the client's notes are INFO lines on every open.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MlflowTracker(Tracker):
    backend = "mlflow"

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info)
        self.client = client(info["uri"])
        self.known_params: dict[str, str] | None = None

    @classmethod
    def open(
        cls,
        settings: Settings,
        runs_dir: str,
        run_name: str,
        default_experiment: str,
        previous: dict[str, Any] | None,
        parent: dict[str, Any] | None,
    ) -> MlflowTracker:
        uri, artifacts = tracking_uri(settings, runs_dir)
        if previous and previous.get("backend") == "mlflow" and previous.get("uri") == uri:
            tracker = cls(previous)
            tracker.client.update_run(previous["run_id"], status="RUNNING")
            return tracker
        c = client(uri)
        name = settings.experiment or default_experiment
        experiment = c.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                folder = re.sub(r"[^A-Za-z0-9._-]", "_", name)
                location = artifacts and "file://" + os.path.join(artifacts, folder)
                experiment_id = c.create_experiment(name, artifact_location=location)
            except Exception:  # created by another process meanwhile
                experiment_id = c.get_experiment_by_name(name).experiment_id
        tags = {"mlflow.parentRunId": parent["run_id"]} if parent else {}
        run = c.create_run(experiment_id, run_name=run_name, tags=tags)
        info = {
            "backend": "mlflow",
            "uri": uri,
            "experiment": name,
            "experiment_id": experiment_id,
            "run_id": run.info.run_id,
            "parent_run_id": parent["run_id"] if parent else None,
        }
        return cls(info)

    @classmethod
    def reopen(cls, info: dict[str, Any]) -> MlflowTracker:
        return cls(info)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self.known_params is None:
            self.known_params = dict(self.client.get_run(self.run_id).data.params)
        # A param is immutable in MLflow: a resumed run keeps the value it started with.
        new = {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items() if k not in self.known_params}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS])
        self.known_params.update(new)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i : i + MAX_METRICS])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, tags=items[i : i + MAX_PARAMS])

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        with local_copy(path) as local:
            self.client.log_artifact(self.run_id, local, artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def where(self) -> str:
        uri = self.info["uri"]
        how = (
            "lmforge ui --runs-dir " + os.path.dirname(uri[len("sqlite:///") :])
            if uri.startswith("sqlite:///")
            else uri
        )
        return f"MLflow run {self.run_id} in experiment '{self.info['experiment']}': {how}"
