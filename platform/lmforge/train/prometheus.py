"""Training metrics as Prometheus gauges, for the Grafana dashboard's Training row.

Rank 0 sets one gauge per metric of each `metrics.jsonl` line through `ray.util.metrics`, so
Ray's per-node metrics agent exports them (the chart's PodMonitor scrapes that port). Ray
prefixes application metrics with `ray_`: the gauge `lmforge_train_loss` is scraped as
`ray_lmforge_train_loss`, with a `run` label (the run directory's name). Only under Ray: a
plain `run_local` has no agent to export through.
"""

from __future__ import annotations

from typing import Any

# metrics.jsonl key -> (gauge name, description)
GAUGES: dict[str, tuple[str, str]] = {
    "step": ("lmforge_train_step", "optimizer steps done"),
    "loss": ("lmforge_train_loss", "training loss (nats/token) of the last step"),
    "lr": ("lmforge_train_learning_rate", "learning rate of the last step"),
    "grad_norm": ("lmforge_train_grad_norm", "global gradient norm before clipping"),
    "tokens_per_s": ("lmforge_train_tokens_per_second", "tokens per second over all workers"),
    "mfu": ("lmforge_train_mfu", "model FLOPs utilisation (0..1)"),
    "memory_gib": ("lmforge_train_memory_gib", "peak device (or host) memory of rank 0, GiB"),
    "eta_s": ("lmforge_train_eta_seconds", "estimated seconds to the last step"),
    "val_loss": ("lmforge_train_val_loss", "validation loss (nats/token)"),
    "val_bpb": ("lmforge_train_val_bits_per_byte", "validation bits per byte"),
}
RAY_PREFIX = "ray_"


def exported_names() -> set[str]:
    """The names Prometheus sees (with Ray's prefix)."""
    return {RAY_PREFIX + name for name, _ in GAUGES.values()}


class TrainGauges:
    """Gauges created on first use; `factory` is `ray.util.metrics.Gauge` (a fake in tests)."""

    def __init__(self, run: str, factory=None) -> None:
        if factory is None:
            from ray.util.metrics import Gauge as factory
        self.run, self.factory, self.gauges = run, factory, {}

    def update(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if key not in GAUGES or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key not in self.gauges:
                name, description = GAUGES[key]
                self.gauges[key] = self.factory(name, description=description, tag_keys=("run",))
            self.gauges[key].set(float(value), tags={"run": self.run})
