"""The monitor report: served traffic and feedback per model version, as Markdown, HTML or
JSON, from the request log and feedback store that the serving app writes (the command line,
`lmforge monitor report`, is in command.py).

The report is a list of blocks (headings, text, tables, plots) rendered to Markdown (plots
as PNG files next to it) or HTML (plots embedded as base64 PNG): latency, output length and
feedback per version, and the daily series.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import os
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from lmforge import LmforgeError, storage
from lmforge.monitor.stats import UNKNOWN
from lmforge.plots import new_figure, png_bytes


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "text" | "table" | "plot"
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    png: bytes = b""


def load_logs(path: str, since: dt.datetime | None) -> tuple[pa.Table, pa.Table]:
    """The request and feedback rows under a log path (at or after `since`)."""
    from lmforge.serve.logreader import read_log

    if not storage.is_dir(path):
        raise LmforgeError(
            f"--logs {path}: no such directory; give the serving config's request-log path "
            "(it holds requests/ and feedback/)"
        )
    return read_log(path, "requests", since), read_log(path, "feedback", since)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def report_blocks(summary: dict[str, Any], logs: str, since: dt.datetime | None) -> list[Block]:
    versions, total = summary["versions"], summary["total"]
    window = f"since {since.isoformat()}" if since else "everything logged"
    blocks = [
        Block("h1", "lmforge monitor report"),
        Block(
            "text",
            f"Logs: `{logs}` ({window}); rows from {summary['first']} to "
            f"{summary['last']}. Latency in seconds; errors are HTTP 5xx.",
        ),
        Block("h2", "Per model version"),
    ]
    rows = [
        (
            v,
            ", ".join(s["models"]) or "-",
            str(s["requests"]),
            _pct(s["error_rate"]),
            _num(s["latency_s"]["p50"]),
            _num(s["latency_s"]["p95"]),
            _num(s["latency_s"]["p99"]),
            str(s["prompt_tokens"]),
            str(s["completion_tokens"]),
            str(s["feedback"]),
            _pct(s["positive_share"]),
            _pct(s["negative_share"]),
            str(s["corrections"]),
        )
        for v, s in [*versions.items(), ("all", total)]
    ]
    header = (
        "version",
        "models",
        "requests",
        "error rate",
        "p50",
        "p95",
        "p99",
        "tokens in",
        "tokens out",
        "feedback",
        "positive",
        "negative",
        "corrections",
    )
    blocks.append(Block("table", header=header, rows=tuple(rows)))
    bins = tuple(total["length_histogram"])
    blocks += [
        Block("h2", "Output length (completion tokens)"),
        Block(
            "table",
            header=("version", "p50", "p95", "p99", "mean", *bins),
            rows=tuple(
                (
                    v,
                    _num(s["completion_length"]["p50"]),
                    _num(s["completion_length"]["p95"]),
                    _num(s["completion_length"]["p99"]),
                    _num(s["mean_completion_tokens"]),
                    *(str(s["length_histogram"][b]) for b in bins),
                )
                for v, s in versions.items()
            ),
        ),
        Block("h2", "Feedback tags and finish reasons"),
        Block(
            "table",
            header=("version", "top tags", "finish reasons"),
            rows=tuple(
                (
                    v,
                    ", ".join(f"{t} ({n})" for t, n in s["top_tags"].items()) or "-",
                    ", ".join(f"{r} ({n})" for r, n in s["finish_reasons"].items()) or "-",
                )
                for v, s in versions.items()
            ),
        ),
        Block("h2", "Daily"),
        Block(
            "table",
            header=(
                "date",
                "requests",
                "error rate",
                "p95 latency",
                "tokens out",
                "feedback",
                "negative",
            ),
            rows=tuple(
                (
                    d["date"],
                    str(d["requests"]),
                    _pct(d["error_rate"]),
                    _num(d["latency_p95_s"]),
                    str(d["completion_tokens"]),
                    str(d["feedback"]),
                    _pct(d["negative_share"]),
                )
                for d in summary["daily"]
            ),
        ),
    ]
    if UNKNOWN in versions:
        blocks.append(Block("text", f"`{UNKNOWN}`: rows that name no model version."))
    return blocks


def feedback_shares(summary: dict[str, Any]) -> list[tuple[str, float, float]]:
    """What the feedback plot shows: (version, positive %, negative %) of each version's feedback."""
    return [
        (v, 100 * (s["positive_share"] or 0), 100 * (s["negative_share"] or 0))
        for v, s in summary["versions"].items()
    ]


def plot_blocks(summary: dict[str, Any], requests: pa.Table) -> list[Block]:
    """PNG plots: latency, output length and feedback per version, and the daily series."""
    import numpy as np

    versions = [v or UNKNOWN for v in requests["model_version"].to_pylist()]
    latency = requests["latency_s"].to_numpy(zero_copy_only=False).astype(float)
    blocks = [Block("h2", "Plots")]
    fig = new_figure(15, 3.8)
    axes = fig.subplots(1, 3)
    for version in summary["versions"]:
        mine = latency[[v == version for v in versions]] if versions else latency
        mine = mine[~np.isnan(mine)]
        if mine.size:
            axes[0].hist(mine, bins=30, histtype="step", label=version)
        hist = summary["versions"][version]["length_histogram"]
        axes[1].plot(list(hist), list(hist.values()), marker="o", label=version)
    axes[0].set(title="latency", xlabel="seconds", ylabel="requests")
    axes[1].set(title="output length", xlabel="completion tokens", ylabel="requests")
    shares = feedback_shares(summary)
    x = np.arange(len(shares))
    axes[2].bar(x - 0.2, [p for _, p, _ in shares], 0.4, color="C2", label="positive")
    axes[2].bar(x + 0.2, [n for _, _, n in shares], 0.4, color="C3", label="negative")
    axes[2].set_xticks(x, [v for v, _, _ in shares], rotation=30, ha="right", fontsize="small")
    axes[2].set(title="feedback", ylabel="% of the version's feedback", ylim=(0, 100))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    blocks.append(Block("plot", "per-version", png=png_bytes(fig, dpi=90)))
    daily = summary["daily"]
    if daily:
        fig = new_figure(13, 3.5)
        axes = fig.subplots(1, 3)
        days = [d["date"] for d in daily]
        axes[0].bar(days, [d["requests"] for d in daily])
        axes[0].set(title="requests per day")
        axes[1].plot(days, [d["latency_p95_s"] or 0 for d in daily], marker="o")
        axes[1].set(title="p95 latency (s)")
        axes[2].plot(days, [100 * (d["negative_share"] or 0) for d in daily], marker="o")
        axes[2].set(title="negative feedback (%)")
        for ax in axes:
            ax.tick_params(axis="x", labelrotation=45, labelsize="small")
        blocks.append(Block("plot", "daily", png=png_bytes(fig, dpi=90)))
    return blocks


def to_markdown(blocks: list[Block], out: str | None) -> tuple[str, dict[str, bytes]]:
    """Markdown text, and the plot files (path -> PNG) to write next to `out`."""
    lines, files = [], {}
    stem = os.path.splitext(os.path.basename(out))[0] if out else "report"
    for b in blocks:
        if b.kind in ("h1", "h2"):
            lines += [("# " if b.kind == "h1" else "## ") + b.text, ""]
        elif b.kind == "text":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(b.header) + " |")
            lines.append("|" + "---|" * len(b.header))
            lines += ["| " + " | ".join(map(md_cell, r)) + " |" for r in b.rows] + [""]
        elif b.kind == "plot" and out:
            name = f"{stem}-{b.text}.png"
            files[storage.join(os.path.dirname(out) or ".", name)] = b.png
            lines += [f"![{b.text}]({name})", ""]
    return "\n".join(lines), files


MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|!~#&])")


def md_cell(text: str) -> str:
    """A table cell's text as literal Markdown: cells hold what users sent (feedback tags), which
    must not become links, images, HTML or extra columns in a rendered report."""
    return MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def to_html(blocks: list[Block]) -> str:
    parts = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "text":
            parts.append(f"<p>{html.escape(b.text).replace('`', '')}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "plot":
            data = base64.b64encode(b.png).decode()
            parts.append(f'<img alt="{b.text}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>lmforge monitor report"
        f"</title><style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_report(
    summary: dict[str, Any],
    requests: pa.Table,
    logs: str,
    since: dt.datetime | None,
    out: str | None,
) -> None:
    """Render and write the report (or print Markdown tables when `out` is None)."""
    suffix = os.path.splitext(out or "")[1].lower()
    if out and suffix not in (".md", ".html", ".htm", ".json"):
        raise LmforgeError(f"--out {out}: give a .md, .html or .json file name")
    if suffix == ".json":
        storage.write_json(out, summary)
    else:
        blocks = report_blocks(summary, logs, since)
        if out:
            blocks += plot_blocks(summary, requests)
        if suffix in (".html", ".htm"):
            storage.write_text(out, to_html(blocks))
        else:
            text, files = to_markdown(blocks, out)
            for path, png in files.items():
                storage.write_bytes(path, png)
            if not out:
                print(text, end="")
                return
            storage.write_text(out, text)
    total = summary["total"]
    print(
        f"monitor report: {total['requests']} requests, {total['feedback']} feedback over "
        f"{len(summary['versions'])} version(s) -> {out}"
    )
