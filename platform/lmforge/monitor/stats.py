"""Numbers of the monitor report, per model version, from the request log and feedback tables.

Every function takes pyarrow tables in `serve.requestlog`'s REQUEST_SCHEMA / FEEDBACK_SCHEMA
and returns plain dicts (JSON-ready), so the report, the improvement job and tests share them.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmforge import ConfigError

UNKNOWN = "unknown"  # the version of rows that name none
PERCENTILES = (50, 95, 99)
# Output-length histogram bins (completion tokens), right-open: [0, 1), [1, 16), ...
LENGTH_BINS = (0, 1, 16, 64, 256, 1024, 4096)

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([mhdw])$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """`24h`, `7d`, `30m`, `2w` (before `now`), or an ISO date/time (UTC unless it says);
    None or "" for everything."""
    if not text:
        return None
    now = now or dt.datetime.now(dt.UTC)
    match = _AGO.match(text.strip().lower())
    if match:
        return now - dt.timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
    try:
        since = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: expected a duration like 24h, 7d, 30m, 2w or an ISO date/time "
            "like 2026-01-31 or 2026-01-31T12:00:00Z"
        ) from None
    return since if since.tzinfo else since.replace(tzinfo=dt.UTC)


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    """p50/p95/p99 (linear interpolation, numpy's default); None for no values."""
    values = values[~np.isnan(values)] if values.size else values
    if not values.size:
        return {f"p{p}": None for p in PERCENTILES}
    found = np.percentile(values, PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, found, strict=True)}


def _floats(table: pa.Table, column: str) -> np.ndarray:
    return table[column].to_numpy(zero_copy_only=False).astype(float)  # nulls -> nan


def _versions(table: pa.Table) -> list[str]:
    return [v or UNKNOWN for v in table["model_version"].to_pylist()]


def feedback_with_versions(requests: pa.Table, feedback: pa.Table) -> pa.Table:
    """Feedback whose model_version is null (a replica that did not see the completion) takes
    it from the logged request with the same completion_id, where there is one."""
    ids, versions = requests["completion_id"].to_pylist(), requests["model_version"].to_pylist()
    known = dict(zip(ids, versions, strict=True))
    pairs = zip(
        feedback["model_version"].to_pylist(), feedback["completion_id"].to_pylist(), strict=True
    )
    filled = [v or known.get(c) for v, c in pairs]
    index = feedback.schema.get_field_index("model_version")
    return feedback.set_column(index, "model_version", pa.array(filled, pa.string()))


def request_stats(requests: pa.Table) -> dict[str, Any]:
    """Counts, error rate, latency and token statistics of some request rows."""
    status = requests["status"].to_numpy(zero_copy_only=False).astype(float)
    completion = _floats(requests, "completion_tokens")
    prompt = _floats(requests, "prompt_tokens")
    n = requests.num_rows
    lengths = completion[~np.isnan(completion)]
    counts, _ = np.histogram(lengths, bins=[*LENGTH_BINS, np.inf])
    finish = Counter(r or "-" for r in requests["finish_reason"].to_pylist())
    return {
        "requests": n,
        "errors": int(np.sum(status >= 500)),
        "error_rate": float(np.sum(status >= 500)) / n if n else None,
        "client_errors": int(np.sum((status >= 400) & (status < 500))),
        "latency_s": percentiles(_floats(requests, "latency_s")),
        "prompt_tokens": int(np.nansum(prompt)),
        "completion_tokens": int(np.nansum(completion)),
        "mean_prompt_tokens": float(np.nanmean(prompt)) if np.any(~np.isnan(prompt)) else None,
        "mean_completion_tokens": float(lengths.mean()) if lengths.size else None,
        "completion_length": percentiles(lengths),
        "length_histogram": {_bin_name(i): int(c) for i, c in enumerate(counts)},
        "finish_reasons": dict(finish.most_common()),
    }


def _bin_name(i: int) -> str:
    bins = [*LENGTH_BINS, None]
    return f"{bins[i]}+" if bins[i + 1] is None else f"{bins[i]}-{bins[i + 1] - 1}"


def feedback_stats(feedback: pa.Table, top_tags: int = 10) -> dict[str, Any]:
    """Counts and shares of ratings, corrections and the most frequent tags."""
    rating = _floats(feedback, "rating")
    n = feedback.num_rows
    corrections = sum(1 for c in feedback["correction"].to_pylist() if c and c.strip())
    tags = Counter(t for row in feedback["tags"].to_pylist() for t in (row or []))
    return {
        "feedback": n,
        "positive": int(np.sum(rating > 0)),
        "negative": int(np.sum(rating < 0)),
        "positive_share": float(np.sum(rating > 0)) / n if n else None,
        "negative_share": float(np.sum(rating < 0)) / n if n else None,
        "mean_rating": float(rating.mean()) if n else None,
        "corrections": corrections,
        "top_tags": dict(tags.most_common(top_tags)),
    }


def _where(table: pa.Table, mask: list[bool]) -> pa.Table:
    return table.filter(pa.array(mask, pa.bool_()))


def daily_series(requests: pa.Table, feedback: pa.Table) -> list[dict[str, Any]]:
    """One row per UTC day with traffic or feedback: requests, error rate, p95 latency,
    feedback and its negative share."""
    req_days = [t.strftime("%Y-%m-%d") for t in requests["time"].to_pylist()]
    fb_days = [t.strftime("%Y-%m-%d") for t in feedback["time"].to_pylist()]
    rows = []
    for day in sorted(set(req_days) | set(fb_days)):
        r = request_stats(_where(requests, [d == day for d in req_days]))
        f = feedback_stats(_where(feedback, [d == day for d in fb_days]))
        rows.append(
            {
                "date": day,
                "requests": r["requests"],
                "error_rate": r["error_rate"],
                "latency_p95_s": r["latency_s"]["p95"],
                "completion_tokens": r["completion_tokens"],
                "feedback": f["feedback"],
                "negative_share": f["negative_share"],
            }
        )
    return rows


def summarize(requests: pa.Table, feedback: pa.Table) -> dict[str, Any]:
    """The whole report: totals, per model version, and per day."""
    feedback = feedback_with_versions(requests, feedback)
    req_versions, fb_versions = _versions(requests), _versions(feedback)
    versions = {}
    for version in sorted(set(req_versions) | set(fb_versions)):
        r = _where(requests, [v == version for v in req_versions])
        f = _where(feedback, [v == version for v in fb_versions])
        models = sorted({m for m in pc.unique(r["model"]).to_pylist() if m})
        versions[version] = {"models": models, **request_stats(r), **feedback_stats(f)}
    times = [*requests["time"].to_pylist(), *feedback["time"].to_pylist()]
    return {
        "first": min(times).isoformat() if times else None,
        "last": max(times).isoformat() if times else None,
        "total": {
            "models": sorted({m for v in versions.values() for m in v["models"]}),
            **request_stats(requests),
            **feedback_stats(feedback),
        },
        "versions": versions,
        "daily": daily_series(requests, feedback),
    }
