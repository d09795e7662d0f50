"""The `tracking:` section every stage config has (`StageConfig.tracking`); not hashed: where a
run is recorded does not change what it computes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config import StrictModel
from lmforge.tracking.base import Settings


class TrackingConfig(StrictModel):
    backend: Literal["mlflow", "wandb", "tensorboard", "none"] = Field(
        "mlflow",
        description="Where params, metrics and artifacts of each run go: mlflow (default; an embedded SQLite store under runs_dir unless uri or MLFLOW_TRACKING_URI names a server), wandb (offline unless WANDB_MODE says otherwise; the wandb extra), tensorboard (event files), none.",
    )
    uri: str | None = Field(
        None,
        description="mlflow: the tracking URI (http://..., sqlite:///...). None: MLFLOW_TRACKING_URI, else <runs_dir>/mlflow.db. wandb: the directory its run files go under (None: runs_dir). tensorboard: the log directory (None: <runs_dir>/tensorboard).",
    )
    experiment: str | None = Field(
        None,
        description="Experiment (W&B project) the run is recorded in. None: the pipeline's name in a pipeline, else the stage's name.",
    )

    def settings(self) -> Settings:
        return Settings(self.backend, self.uri, self.experiment)
