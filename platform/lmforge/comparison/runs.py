"""`lmforge runs compare`: what differs between stage runs, how they ended, their loss curves.

A run is an output folder of a stage (`<runs_dir>/<stage>/<name>-<hash>`, or `@<stage>/<run
name>` for the latest complete one). Each holds `resolved_config.yaml`; the config diff is the
flattened keys (`optim.lr`, `model.preset`) whose values are not the same in every run. The
final metrics come from the files the stages write: `metrics.jsonl` (train, finetune: each
key's last logged value), `report.json` (eval: `task/metric`), `manifest.json` (data: counts).
A run still training compares too: it has its config and the metrics logged so far.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from lmforge import LmforgeError, storage
from lmforge.eval.report import fmt
from lmforge.plots import loss_series, overlay_figure, png_bytes, read_metrics
from lmforge.stage import RESOLVED_CONFIG, read_run_reference

ABSENT = "(absent)"
# metrics.jsonl keys, in the order the table shows them (then eval/... keys, sorted)
TRAIN_KEYS = (
    "step",
    "loss",
    "val_loss",
    "val_bpb",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "mfu",
    "memory_gib",
)
DATA_KEYS = (
    "documents_in",
    "documents_out",
    "duplicates_exact",
    "duplicates_near",
    "tokens_train",
    "tokens_val",
    "vocab_size",
)
MAX_CELL = 40


@dataclass
class RunRecord:
    label: str
    path: str
    config: dict[str, Any]  # flattened: "optim.lr" -> value
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    final: dict[str, Any] = field(default_factory=dict)


def resolve_run(ref: str, runs_dir: str) -> str:
    """A run folder from a path or `@<stage>/<run name>`; one clear error if it is not one."""
    path = read_run_reference(runs_dir, ref, "run") if ref.startswith("@") else ref
    if not storage.is_dir(path):
        raise LmforgeError(
            f"{ref}: no such run directory; give a stage's output folder "
            "(e.g. runs/train/tiny-1a2b3c4d5e6f) or @<stage>/<run name> (with --runs-dir)"
        )
    if not storage.exists(storage.join(path, RESOLVED_CONFIG)):
        raise LmforgeError(
            f"{ref}: not a stage run (no {RESOLVED_CONFIG} in {path}); give the folder "
            "a stage wrote, e.g. runs/train/tiny-1a2b3c4d5e6f"
        )
    return path


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys; lists and scalars are values."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def load_run(ref: str, runs_dir: str) -> RunRecord:
    path = resolve_run(ref, runs_dir)
    config_path = storage.join(path, RESOLVED_CONFIG)
    try:
        config = yaml.safe_load(storage.read_text(config_path)) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{config_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    record = RunRecord(run_label(ref, path), path, flatten(config), read_metrics(path))
    record.final = final_metrics(record.rows, path)
    return record


def run_label(ref: str, path: str) -> str:
    return ref if ref.startswith("@") else path.rstrip("/").rsplit("/", 1)[-1]


def final_metrics(rows: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """Each metric's last logged value, then an eval report's scores and a data manifest's counts."""
    last: dict[str, Any] = {}
    for row in rows:
        last.update({k: v for k, v in row.items() if v is not None})
    final = {k: last[k] for k in TRAIN_KEYS if k in last}
    final.update({k: last[k] for k in sorted(last) if k.startswith("eval/")})
    report = storage.join(path, "report.json")
    if storage.exists(report):
        for task, metrics in json.loads(storage.read_text(report)).get("tasks", {}).items():
            for metric, m in metrics.items():
                final[f"{task}/{metric}"] = m.get("value")
                if m.get("stderr") is not None:
                    final[f"{task}/{metric} stderr"] = m["stderr"]
    manifest = storage.join(path, "manifest.json")
    if storage.exists(manifest):
        data = json.loads(storage.read_text(manifest))
        final.update({k: data[k] for k in DATA_KEYS if k in data})
    return final


def config_diff(runs: list[RunRecord]) -> list[tuple[str, list[Any]]]:
    """(key, value per run) for every flattened config key whose values differ."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys]
    diff = []
    for key in keys:
        values = [run.config.get(key, ABSENT) for run in runs]
        if any(v != values[0] for v in values[1:]):
            diff.append((key, values))
    return diff


def metrics_table(runs: list[RunRecord]) -> list[tuple[str, list[Any]]]:
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.final if k not in keys]
    return [(key, [run.final.get(key) for run in runs]) for key in keys]


def cell(value: Any, exact: bool = False, sci: bool = False) -> str:
    """A table cell: config values as written (`exact`), metrics to 4 digits (`sci`: all in
    scientific notation, so a row's values line up)."""
    if value is None:
        return "-"
    if value == ABSENT:
        return ABSENT
    if isinstance(value, bool) or not isinstance(value, int | float):
        text = value if isinstance(value, str) else json.dumps(value)
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = repr(value) if exact else f"{value:.4e}" if sci else fmt(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def text_table(
    first: str, labels: list[str], rows: list[tuple[str, list[Any]]], exact: bool = False
) -> str:
    lines = [(first, *labels)]
    for key, values in rows:
        sci = not exact and any("e" in fmt(v) for v in _floats(values))
        lines.append((key, *(cell(v, exact, sci) for v in values)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _floats(values: list[Any]) -> list[float]:
    return [v for v in values if isinstance(v, float)]


def write_overlay(runs: list[RunRecord], out: str, x: str) -> bool:
    """The loss curves of the runs that have one, overlaid in `out`; False when none has."""
    curves = {run.label: loss_series(run.rows, x) for run in runs if run.rows}
    curves = {k: s for k, s in curves.items() if s["loss"] or s["val_loss"]}
    if not curves:
        return False
    label = "tokens seen" if x == "tokens" else "step"
    storage.write_bytes(out, png_bytes(overlay_figure(curves, label)))
    return True


def compare_runs(refs: list[str], runs_dir: str, out: str, x: str = "step") -> dict[str, Any]:
    """Print the config diff and final metrics of `refs`; write the loss overlay to `out`."""
    runs = [load_run(ref, runs_dir) for ref in refs]
    labels = unique_labels([run.label for run in runs])
    for run, label in zip(runs, labels, strict=True):
        run.label = label
    diff, metrics = config_diff(runs), metrics_table(runs)
    for run in runs:
        print(f"{run.label}: {run.path}")
    print("\nconfig differences:")
    print(
        text_table("key", labels, diff, exact=True)
        if diff
        else "  (none: the resolved configs are equal)"
    )
    print("\nfinal metrics:")
    print(text_table("metric", labels, metrics) if metrics else "  (none logged)")
    plotted = write_overlay(runs, out, x)
    print(f"\nloss curves: {out}" if plotted else "\nloss curves: none (no run has metrics.jsonl)")
    return {
        "runs": {run.label: run.path for run in runs},
        "config_diff": {key: values for key, values in diff},
        "final_metrics": {key: values for key, values in metrics},
        "plot": out if plotted else None,
    }


def unique_labels(labels: list[str]) -> list[str]:
    return [
        f"{label} ({i + 1})" if labels.count(label) > 1 else label for i, label in enumerate(labels)
    ]
