"""Reports: report.json (task -> metric -> value, stderr, n), report.md (a table), scores.png
(a bar per task and metric, +-1 standard error) and, over checkpoints, a PNG of one metric.

report.json:

    {"model": "<artifact>", "tasks": {"<task>": {"<metric>": {"value": .., "stderr": .., "n": ..}}},
     "problems": {"<task>": ["file:line: why", ...]},
     "checkpoints": [{"model": .., "step": .., "tasks": {...}}, ...]}      (when several models)

`lmforge eval compare` reads the `tasks` mapping of two such files.
"""

from __future__ import annotations

import math
from typing import Any

from lmforge import storage
from lmforge.plots import new_figure, png_bytes, score_bars, score_figure

LOWER_IS_BETTER = {"loss", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity"}
HIGHER_IS_BETTER = {"acc", "acc_norm", "exact_match", "f1", "macro_f1"}
# pct_stereotype (ideal 0.5) and likelihood_diff describe a model; they are not gated by default.


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value != 0 and not 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}e}"
    return f"{value:.{digits}f}"


def markdown_table(tasks: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for task, metrics in tasks.items():
        for name, m in metrics.items():
            value = fmt(m["value"])
            if m.get("ci"):
                value += f" (95% CI {fmt(m['ci'][0], 3)}-{fmt(m['ci'][1], 3)})"
            rows.append(f"| {task} | {name} | {value} | {fmt(m.get('stderr'))} | {m['n']} |")
    return "\n".join(rows)


def text_table(tasks: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The same table for a terminal."""
    lines = [("task", "metric", "value", "stderr", "n")]
    for task, metrics in tasks.items():
        for name, m in metrics.items():
            value = fmt(m["value"])
            if m.get("ci"):
                value += f" [{fmt(m['ci'][0], 3)}, {fmt(m['ci'][1], 3)}]"
            lines.append((task, name, value, fmt(m.get("stderr")), str(m["n"])))
    widths = [max(len(row[i]) for row in lines) for i in range(5)]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        )
        for row in lines
    )


def write_report(output: str, report: dict[str, Any]) -> None:
    storage.write_json(storage.join(output, "report.json"), report)
    parts = [f"# Evaluation of `{report['model']}`\n", markdown_table(report["tasks"]), ""]
    if chart := write_score_chart(output, report["tasks"]):
        parts += [f"![task scores]({chart})", ""]
    problems = {t: p for t, p in report.get("problems", {}).items() if p}
    if problems:
        parts.append("## Skipped items\n")
        for task, lines in problems.items():
            shown = lines[:20]
            parts.append(f"- **{task}**: {len(lines)} skipped")
            parts += [f"  - `{p}`" for p in shown]
            if len(lines) > len(shown):
                parts.append(f"  - ... and {len(lines) - len(shown)} more (report.json)")
        parts.append("")
    checkpoints = report.get("checkpoints") or []
    if len(checkpoints) > 1:
        parts.append("## Checkpoints\n")
        for c in checkpoints:
            parts.append(f"### step {c['step']}: `{c['model']}`\n")
            parts.append(markdown_table(c["tasks"]) + "\n")
        if report.get("plot"):
            parts.append(f"![bits per byte over steps]({report['plot']})\n")
    storage.write_text(storage.join(output, "report.md"), "\n".join(parts))


SCORES_PNG = "scores.png"


def write_score_chart(output: str, tasks: dict[str, dict[str, dict[str, Any]]]) -> str | None:
    """`scores.png`: the task scores as bars with +-1 standard error; None with nothing to plot."""
    bars = score_bars(tasks)
    if not bars:
        return None
    storage.write_bytes(storage.join(output, SCORES_PNG), png_bytes(score_figure(bars)))
    return SCORES_PNG


def over_steps(checkpoints: list[dict[str, Any]], metric: str) -> dict[str, list[tuple]]:
    """task -> [(step, value)], ascending, for every task that has the metric."""
    series: dict[str, list[tuple]] = {}
    for c in checkpoints:
        for task, metrics in c["tasks"].items():
            if metric in metrics:
                series.setdefault(task, []).append((c["step"], metrics[metric]["value"]))
    return {task: sorted(points) for task, points in sorted(series.items())}


def plot_over_steps(
    output: str, checkpoints: list[dict[str, Any]], metric: str = "bits_per_byte"
) -> str | None:
    """`<metric>_over_steps.png`: one line per task that has the metric; None without two
    checkpoints to plot."""
    series = over_steps(checkpoints, metric)
    if len(checkpoints) < 2 or not series:
        return None
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for task, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    name = f"{metric}_over_steps.png"
    storage.write_bytes(storage.join(output, name), png_bytes(fig))
    return name
