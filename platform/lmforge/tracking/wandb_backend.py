"""Weights & Biases: offline by default (WANDB_MODE, when set, decides), so a run needs no
account and no network; `wandb sync <dir>/wandb/offline-run-*` uploads it later. `tracking.uri`
is the directory W&B writes under (default: runs_dir). The `wandb` extra installs the SDK.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from lmforge import ConfigError, storage
from lmforge.tracking.base import Settings, Tracker, local_copy


def sdk():
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "tracking.backend wandb needs the W&B SDK: pip install 'lmforge[wandb]'"
        ) from None
    return wandb


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info)
        self._run = None

    @property
    def run(self):
        """The SDK's run, started on first use: one process at a time writes a W&B run, so the
        stage runner closes its own while the training workers log (each start is an attempt
        of the same run id; `wandb sync` merges them)."""
        if self._run is None:
            self._run = start(self.info)
        return self._run

    @classmethod
    def open(
        cls,
        settings: Settings,
        runs_dir: str,
        run_name: str,
        default_experiment: str,
        previous: dict[str, Any] | None,
        parent: dict[str, Any] | None,
    ) -> WandbTracker:
        directory = settings.uri or runs_dir
        if not storage.is_local(directory):
            raise ConfigError(
                f"tracking: W&B writes its run files to a local directory, not {directory}; "
                "set tracking.uri to one"
            )
        directory = os.path.abspath(storage.local_path(directory))
        sdk()  # not installed: say which extra, before the run starts
        if previous and previous.get("backend") == "wandb" and previous.get("dir") == directory:
            info = previous
        else:
            info = {
                "backend": "wandb",
                "dir": directory,
                "experiment": settings.experiment or default_experiment,
                "run_id": uuid.uuid4().hex[:12],
                "run_name": run_name,
                "group": parent["run_id"] if parent else None,
            }
        return cls(info)

    @classmethod
    def reopen(cls, info: dict[str, Any]) -> WandbTracker:
        return cls(info)

    def log_params(self, params: dict[str, Any]) -> None:
        # As in MLflow, a resumed run keeps the values it started with.
        new = {k: v for k, v in params.items() if k not in self.run.config}
        self.run.config.update(new)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # W&B drops a step lower than its last one: stepless metrics (finals) go to the summary.
        if step is None:
            self.run.summary.update(metrics)
        else:
            self.run.log(metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.run.summary.update({f"tag.{k}": str(v) for k, v in tags.items()})

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        with local_copy(path) as local:
            base = os.path.dirname(local)
            if folder:  # keep the folder in the run's files: files/<folder>/<name>
                target = os.path.join(self.run.dir, folder, os.path.basename(local))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(local, "rb") as src, open(target, "wb") as dst:
                    dst.write(src.read())
                local, base = target, self.run.dir
            self.run.save(local, base_path=base, policy="now")

    def finish(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        self._run = None

    def close(self) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0)
            self._run = None

    def where(self) -> str:
        mode = os.environ.get("WANDB_MODE", "offline")
        return f"W&B run {self.run_id} ({mode}) under {self.info['dir']}/wandb"


def start(info: dict[str, Any]):
    wandb = sdk()
    os.makedirs(info["dir"], exist_ok=True)
    return wandb.init(
        project=info["experiment"],
        name=info["run_name"],
        id=info["run_id"],
        group=info.get("group"),
        dir=info["dir"],
        mode=os.environ.get("WANDB_MODE", "offline"),
        resume="allow",
        reinit="create_new",
        settings=wandb.Settings(silent=True, console="off"),
    )
