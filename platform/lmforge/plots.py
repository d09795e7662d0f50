"""The PNG figures of every run: the loss curve (`loss.png` of a training or fine-tuning run),
the eval report's task scores, the data stage's document funnel, the overlay of `lmforge runs
compare`; and the one reader of `metrics.jsonl` they share.

matplotlib is imported inside the functions (the CLI's `--help` stays instant) and only through
its object API on the Agg canvas: no pyplot, so no global figure state (a training run draws
in a background thread, train/export.py) and no GUI backend. Each figure has a function for
the data it plots (plain lists, tested against the files they come from) and one that draws it.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from lmforge import LmforgeError, storage

LOSS_PNG = "loss.png"
METRICS_FILE = "metrics.jsonl"

Series = list[tuple[float, float]]  # (x, y) points, x ascending


# ---------------------------------------------------------------- metrics.jsonl


def parse_metrics(text: str, where: str) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl` text, one per step, ascending.

    A step logged twice (a run resumed from a checkpoint older than its last log lines logs
    those steps again) keeps the later line's values. A last line cut short (a worker killed
    mid-write) is ignored; any other line that is not a JSON object is an error.
    """
    by_step: dict[int, dict[str, Any]] = {}
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise LmforgeError(
                f"{where}:{number}: not a JSON line; is this a metrics.jsonl?"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise LmforgeError(f"{where}:{number}: a metrics line needs an integer 'step'")
        by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The rows of `<run_dir>/metrics.jsonl` ([] when the run has logged nothing yet)."""
    path = storage.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    return parse_metrics(storage.read_text(path), path)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def metric_series(rows: list[dict[str, Any]], key: str, x: str = "step") -> Series:
    """(x, value) of every row that has a finite `key`; x is the step, or `tokens` seen (from
    the rows' tokens per step, so eval-only rows get their x too)."""
    per_step = tokens_per_step(rows) if x == "tokens" else 1.0
    if per_step is None:
        raise LmforgeError("no 'tokens' in metrics.jsonl to put on the x axis; use --x step")
    return [(row["step"] * per_step, float(row[key])) for row in rows if _number(row.get(key))]


def tokens_per_step(rows: list[dict[str, Any]]) -> float | None:
    for row in rows:
        if row["step"] > 0 and _number(row.get("tokens")):
            return row["tokens"] / row["step"]
    return None


def loss_series(rows: list[dict[str, Any]], x: str = "step") -> dict[str, Series]:
    """What `loss.png` plots: train loss, val loss and learning rate over steps."""
    return {key: metric_series(rows, key, x) for key in ("loss", "val_loss", "lr")}


# ---------------------------------------------------------------- drawing


def new_figure(width: float, height: float):
    """A figure on the Agg canvas (matplotlib's object API: no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def loss_figure(series: dict[str, Series], title: str, x_label: str = "step"):
    """Train loss (line), val loss (markers) on the left axis, learning rate on the right."""
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    if series["loss"]:
        ax.plot(*zip(*series["loss"], strict=True), color="C0", lw=1.2, label="train loss")
    if series["val_loss"]:
        ax.plot(*zip(*series["val_loss"], strict=True), "o-", color="C1", ms=4, label="val loss")
    ax.set(xlabel=x_label, ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if series["lr"]:
        lr_ax = ax.twinx()
        lr_ax.plot(*zip(*series["lr"], strict=True), color="C2", lw=1, ls=":", label="lr")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize="small")
    return fig


def write_loss_curve(run_dir: str) -> str | None:
    """`<run_dir>/loss.png` from its metrics.jsonl; the path, or None before any loss is logged."""
    series = loss_series(read_metrics(run_dir))
    if not series["loss"] and not series["val_loss"]:
        return None
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    path = storage.join(run_dir, LOSS_PNG)
    storage.write_bytes(path, png_bytes(loss_figure(series, name)))
    return path


def overlay_figure(runs: dict[str, dict[str, Series]], x_label: str = "step"):
    """The loss curves of several runs: one colour per run, train solid, val dashed."""
    fig = new_figure(8, 4.5)
    ax = fig.add_subplot()
    for i, (label, series) in enumerate(runs.items()):
        color = f"C{i % 10}"
        if series["loss"]:
            ax.plot(*zip(*series["loss"], strict=True), color=color, lw=1.2, label=f"{label} train")
        if series["val_loss"]:
            ax.plot(
                *zip(*series["val_loss"], strict=True),
                "o--",
                color=color,
                ms=3,
                label=f"{label} val",
            )
    ax.set(xlabel=x_label, ylabel="loss (nats/token)", title="loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def score_bars(
    tasks: dict[str, dict[str, dict[str, Any]]],
) -> dict[str, list[tuple[str, float, float]]]:
    """What the eval chart plots: metric -> [(task, value, stderr)], for every finite value
    (a missing or non-finite stderr draws no error bar: 0)."""
    bars: dict[str, list[tuple[str, float, float]]] = {}
    for task, metrics in tasks.items():
        for metric, m in metrics.items():
            if not _number(m.get("value")):
                continue
            err = m.get("stderr")
            bars.setdefault(metric, []).append(
                (task, float(m["value"]), float(err) if _number(err) else 0.0)
            )
    return bars


def score_figure(bars: dict[str, list[tuple[str, float, float]]]):
    """One panel per metric (their scales differ), a bar per task, +-1 standard error."""
    metrics = sorted(bars)
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    widest = max(len(b) for b in bars.values())
    fig = new_figure(max(4.0, 0.6 * widest + 1.5) * cols, 3.4 * rows)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        names, values, errors = zip(*bars[metric], strict=True)
        ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=f"C{i % 10}")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
        ax.set_title(metric.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("task scores (error bars: +-1 standard error)", fontsize="medium")
    return fig


def funnel_steps(manifest: dict[str, Any]) -> list[tuple[str, int]]:
    """What the data funnel plots: (step, documents left after it), from `read` through every
    filter and dedup step (the manifest's `steps`) to the documents packed."""
    points = [(s["step"], int(s["docs_out"])) for s in manifest.get("steps", [])]
    return [*points, ("packed", int(manifest["documents_out"]))]


def funnel_figure(points: list[tuple[str, int]], documents_in: int):
    fig = new_figure(7, 0.45 * len(points) + 1.4)
    ax = fig.add_subplot()
    names = [p[0] for p in points]
    counts = [p[1] for p in points]
    y = range(len(points))[::-1]  # the first step at the top
    ax.barh(list(y), counts, color="C0")
    ax.set_yticks(list(y), names, fontsize="small")
    for yi, n in zip(y, counts, strict=True):
        share = f" ({100 * n / documents_in:.1f}%)" if documents_in else ""
        ax.annotate(
            f"{n:,}{share}",
            (n, yi),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize="x-small",
        )
    ax.set_xlim(0, max(counts + [1]) * 1.3)
    ax.set(xlabel="documents", title=f"documents per step (of {documents_in:,} read)")
    return fig


def write_data_funnel(output: str, manifest: dict[str, Any]) -> str:
    """`<output>/funnel.png`: the documents left after each data step."""
    path = storage.join(output, "funnel.png")
    fig = funnel_figure(funnel_steps(manifest), int(manifest["documents_in"]))
    storage.write_bytes(path, png_bytes(fig))
    return path
