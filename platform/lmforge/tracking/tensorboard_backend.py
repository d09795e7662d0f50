"""TensorBoard event files, written with tensorboardX (which ray[train] installs): scalars by
step under `<tracking.uri or runs_dir/tensorboard>/<experiment>/<run>`; params and tags as a
text summary (TensorBoard has no param table of its own), artifacts copied next to the events.
`tensorboard --logdir <dir>` shows them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

from lmforge import ConfigError, storage
from lmforge.tracking.base import Settings, Tracker, local_copy, param_text


class TensorboardTracker(Tracker):
    backend = "tensorboard"

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(info)
        self._writer = None

    @property
    def writer(self):
        """A writer per opening: each (the stage runner, a worker, a resumed attempt) adds its
        own event file to the run's directory, and TensorBoard merges them. The suffix keeps
        two openings in the same second from writing one file name."""
        if self._writer is None:
            from tensorboardX import SummaryWriter

            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._writer = SummaryWriter(self.info["logdir"], flush_secs=10, filename_suffix=suffix)
        return self._writer

    @classmethod
    def open(
        cls,
        settings: Settings,
        runs_dir: str,
        run_name: str,
        default_experiment: str,
        previous: dict[str, Any] | None,
        parent: dict[str, Any] | None,
    ) -> TensorboardTracker:
        root = settings.uri or storage.join(runs_dir, "tensorboard")
        if not storage.is_local(root):
            raise ConfigError(
                f"tracking: TensorBoard event files are written to a local directory, not {root}; "
                "set tracking.uri to one"
            )
        root = os.path.abspath(storage.local_path(root))
        if previous and previous.get("backend") == "tensorboard" and previous.get("root") == root:
            return cls(previous)
        experiment = settings.experiment or default_experiment
        parts = [experiment, *([parent["run_id"]] if parent else []), run_name]
        logdir = os.path.join(root, *parts)
        info = {
            "backend": "tensorboard",
            "root": root,
            "experiment": experiment,
            "run_id": os.path.relpath(logdir, root),
            "logdir": logdir,
        }
        return cls(info)

    @classmethod
    def reopen(cls, info: dict[str, Any]) -> TensorboardTracker:
        return cls(info)

    def log_params(self, params: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {param_text(v)} |" for k, v in sorted(params.items()))
        self.writer.add_text("params", "| param | value |\n|---|---|\n" + rows)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step or 0)
        self.writer.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(tags.items()))
        self.writer.add_text("tags", "| tag | value |\n|---|---|\n" + rows)

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        target = os.path.join(self.info["logdir"], "artifacts", folder or "")
        os.makedirs(target, exist_ok=True)
        with local_copy(path) as local:
            shutil.copy(local, target)

    def finish(self, status: str = "FINISHED") -> None:
        self.writer.add_text("status", status)
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def where(self) -> str:
        return (
            f"TensorBoard events in {self.info['logdir']}: tensorboard --logdir {self.info['root']}"
        )
