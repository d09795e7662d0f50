"""`lmforge monitor report` on planted request/feedback Parquet logs with known numbers."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge import ConfigError
from lmforge.monitor.stats import parse_since, summarize
from lmforge.serve.requestlog import FEEDBACK_SCHEMA, REQUEST_SCHEMA

DAY1 = dt.datetime(2026, 1, 10, 12, tzinfo=dt.UTC)
DAY2 = dt.datetime(2026, 1, 11, 12, tzinfo=dt.UTC)


def write_rows(root, kind, schema, rows, name="r0-test-0"):
    for day in sorted({r["time"].strftime("%Y-%m-%d") for r in rows}):
        mine = [r for r in rows if r["time"].strftime("%Y-%m-%d") == day]
        (root / kind / f"date={day}").mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(mine, schema=schema)
        pq.write_table(table, root / kind / f"date={day}" / f"{name}.parquet")


def request(i, version, time, latency, status=200, completion_tokens=5):
    return {
        "completion_id": f"{version}-{i}", "time": time, "endpoint": "chat", "model": "tiny",
        "model_version": version, "messages_json": None, "prompt": "p", "completion": "c",
        "finish_reason": "stop" if completion_tokens < 15 else "length", "latency_s": latency,
        "prompt_tokens": 10, "completion_tokens": completion_tokens, "status": status,
        "replica": "r0",
    }  # fmt: skip


def feedback(i, completion_id, version, time, rating, tags=(), correction=None):
    return {
        "feedback_id": f"f{i}", "completion_id": completion_id, "time": time, "rating": rating,
        "correction": correction, "tags": list(tags), "model": "tiny", "model_version": version,
        "replica": "r0",
    }  # fmt: skip


@pytest.fixture
def logs(tmp_path):
    """v-aaa: 100 requests on day 1 (latency 0.01..1.00 s, 5 x 500, 3 x 400, output i % 20
    tokens), 10 feedback; v-bbb: 20 requests on day 2 (2 s, 100 tokens), 2 feedback, one of
    which names no version (it is joined to its request)."""
    root = tmp_path / "logs"
    reqs = [
        request(i, "v-aaa", DAY1 + dt.timedelta(seconds=i), 0.01 * (i + 1),
                status=500 if i < 5 else 400 if i < 8 else 200, completion_tokens=i % 20)
        for i in range(100)
    ] + [request(i, "v-bbb", DAY2 + dt.timedelta(seconds=i), 2.0, completion_tokens=100)
         for i in range(20)]  # fmt: skip
    write_rows(root, "requests", REQUEST_SCHEMA, reqs)
    ratings = [1.0] * 6 + [-1.0] * 3 + [0.0]
    tags = [["good"]] * 6 + [["wrong", "rude"], ["wrong"], ["wrong"], []]
    fbs = [
        feedback(i, f"v-aaa-{i}", "v-aaa", DAY1 + dt.timedelta(minutes=i), r, t,
                 correction="better" if i in (6, 7) else None)
        for i, (r, t) in enumerate(zip(ratings, tags, strict=True))
    ] + [
        feedback(10, "v-bbb-0", "v-bbb", DAY2, -0.5, ["slow"]),
        feedback(11, "v-bbb-1", None, DAY2 + dt.timedelta(hours=1), 1.0),
    ]  # fmt: skip
    write_rows(root, "feedback", FEEDBACK_SCHEMA, fbs)
    return root


def load(root, since=None):
    from lmforge.monitor.report import load_logs

    return load_logs(str(root), since)


def test_per_version_numbers(logs):
    summary = summarize(*load(logs))
    a, b = summary["versions"]["v-aaa"], summary["versions"]["v-bbb"]
    assert set(summary["versions"]) == {"v-aaa", "v-bbb"}
    assert (a["requests"], a["errors"], a["client_errors"]) == (100, 5, 3)
    assert a["error_rate"] == pytest.approx(0.05) and b["error_rate"] == 0
    want = np.percentile(0.01 * np.arange(1, 101), [50, 95, 99])
    assert [a["latency_s"][p] for p in ("p50", "p95", "p99")] == pytest.approx(want)
    assert a["latency_s"]["p50"] == pytest.approx(0.505)
    assert b["latency_s"] == pytest.approx({"p50": 2.0, "p95": 2.0, "p99": 2.0})
    assert (a["prompt_tokens"], a["completion_tokens"]) == (1000, 5 * sum(range(20)))
    assert b["completion_tokens"] == 2000 and b["mean_completion_tokens"] == 100
    # Lengths 0..19 five times each: 5 zeros, 15 x [1, 15], 20 x [16, 19]; all of v-bbb at 100.
    assert a["length_histogram"] == {"0-0": 5, "1-15": 75, "16-63": 20, "64-255": 0,
                                     "256-1023": 0, "1024-4095": 0, "4096+": 0}  # fmt: skip
    assert b["length_histogram"]["64-255"] == 20
    assert a["finish_reasons"] == {"stop": 75, "length": 25}
    assert (a["feedback"], a["positive"], a["negative"], a["corrections"]) == (10, 6, 3, 2)
    assert a["positive_share"] == pytest.approx(0.6) and a["negative_share"] == pytest.approx(0.3)
    assert a["top_tags"] == {"good": 6, "wrong": 3, "rude": 1}
    # The feedback without a version is joined to its request's version.
    assert (b["feedback"], b["positive"], b["negative"]) == (2, 1, 1)
    total = summary["total"]
    assert (total["requests"], total["feedback"], total["errors"]) == (120, 12, 5)
    assert [(d["date"], d["requests"], d["feedback"]) for d in summary["daily"]] == [
        ("2026-01-10", 100, 10), ("2026-01-11", 20, 2)]  # fmt: skip
    assert summary["daily"][0]["negative_share"] == pytest.approx(0.3)


def test_since_filters_rows(logs):
    requests, feedback = load(logs, parse_since("2026-01-11"))
    assert (requests.num_rows, feedback.num_rows) == (20, 2)
    summary = summarize(requests, feedback)
    assert set(summary["versions"]) == {"v-bbb"}
    now = DAY2 + dt.timedelta(hours=1)
    requests, feedback = load(logs, parse_since("2h", now=now))  # 11:00 on day 2 onwards
    assert (requests.num_rows, feedback.num_rows) == (20, 2)
    requests, feedback = load(logs, parse_since("30m", now=now))  # 12:30: the last feedback
    assert (requests.num_rows, feedback.num_rows) == (0, 1)


def test_parse_since():
    now = dt.datetime(2026, 1, 10, tzinfo=dt.UTC)
    assert parse_since("24h", now) == now - dt.timedelta(days=1)
    assert parse_since("7d", now) == now - dt.timedelta(days=7)
    assert parse_since("2026-01-01T06:00:00Z") == dt.datetime(2026, 1, 1, 6, tzinfo=dt.UTC)
    assert parse_since(None) is None
    with pytest.raises(ConfigError, match="expected a duration like 24h"):
        parse_since("yesterday")


def test_markdown_report_with_plots(logs, tmp_path, cli):
    out = tmp_path / "out" / "report.md"
    code, stdout, err = cli("monitor", "report", "--logs", logs, "--out", out)
    assert code == 0, err
    assert "120 requests, 12 feedback over 2 version(s)" in stdout
    text = out.read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| v-aaa | tiny |")]
    assert row.split(" | ")[2:7] == ["100", "5.0%", "0.505", "0.951", "0.99"]
    assert "![daily](report-daily.png)" in text
    for name in ("report-daily.png", "report-per-version.png"):
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_embeds_plots_and_json_has_the_summary(logs, tmp_path, cli):
    assert cli("monitor", "report", "--logs", logs, "--out", tmp_path / "r.html")[0] == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "<td>v-bbb</td>" in page
    assert cli("monitor", "report", "--logs", logs, "--out", tmp_path / "r.json")[0] == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["versions"]["v-aaa"]["requests"] == 100
    assert saved["total"]["negative"] == 4


def test_feedback_plot_shows_each_versions_shares(logs, tmp_path, cli):
    from lmforge.monitor.report import feedback_shares, load_logs
    from lmforge.monitor.stats import summarize

    summary = summarize(*load_logs(str(logs), None))
    shares = {v: (pos, neg) for v, pos, neg in feedback_shares(summary)}
    assert set(shares) == set(summary["versions"])
    for version, (pos, neg) in shares.items():
        s = summary["versions"][version]
        assert pos == pytest.approx(100 * (s["positive_share"] or 0))
        assert neg == pytest.approx(100 * (s["negative_share"] or 0))
    assert any(neg > 0 for _, neg in shares.values())  # the fixture has negative feedback


def test_empty_and_missing_logs_are_clear_errors(tmp_path, logs, cli):
    code, _, err = cli("monitor", "report", "--logs", tmp_path / "nope")
    assert code != 0 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli("monitor", "report", "--logs", tmp_path / "empty")
    assert code != 0 and "no requests or feedback logged under" in err
    code, _, err = cli("monitor", "report", "--logs", logs, "--since", "2030-01-01")
    assert code != 0 and "since 2030-01-01" in err
    code, _, err = cli("monitor", "report", "--logs", logs, "--out", tmp_path / "r.pdf")
    assert code != 0 and "give a .md, .html or .json" in err


def test_stdout_markdown_without_out(logs, cli):
    code, out, _ = cli("monitor", "report", "--logs", logs, "--since", "2026-01-11")
    assert code == 0 and out.startswith("# lmforge monitor report")
    assert "| v-bbb | tiny | 20 |" in out and "v-aaa" not in out


def test_reads_what_the_serving_apps_writer_writes(tmp_path):
    """The serving app's LogWriter (several replicas, several flushes) -> the same numbers."""
    from lmforge.monitor.report import load_logs
    from lmforge.serve.requestlog import LogWriter

    root = str(tmp_path / "log")
    for replica in ("r0", "r1"):
        writer = LogWriter(root, "requests", replica=replica, flush_rows=3)
        for i in range(5):
            writer.add(request(i, f"v-{replica}", DAY1 + dt.timedelta(hours=i), 0.1 * (i + 1)))
        writer.flush()
    fb = LogWriter(root, "feedback", replica="r0")
    fb.add(feedback(0, "v-r1-2", None, DAY2, -1.0, ["wrong"], correction="fixed"))
    fb.flush()
    summary = summarize(*load_logs(root, None))
    assert {v: s["requests"] for v, s in summary["versions"].items()} == {"v-r0": 5, "v-r1": 5}
    r1 = summary["versions"]["v-r1"]
    assert r1["latency_s"]["p50"] == pytest.approx(0.3)
    assert (r1["feedback"], r1["negative"], r1["corrections"]) == (1, 1, 1)
    assert [d["date"] for d in summary["daily"]] == ["2026-01-10", "2026-01-11"]


def test_markdown_report_writes_feedback_tags_as_literal_text(tmp_path, cli):
    """A tag is what a user sent: in the Markdown report it must not add a column, an image, a
    link or HTML."""
    root = tmp_path / "logs"
    write_rows(root, "requests", REQUEST_SCHEMA, [request(0, "v-aaa", DAY1, 0.1)])
    evil = "x | y ![t](http://evil.example/p.png) <img src=x onerror=alert(1)>\n# h"
    write_rows(
        root, "feedback", FEEDBACK_SCHEMA, [feedback(0, "v-aaa-0", "v-aaa", DAY1, 1.0, [evil])]
    )
    code, out, _ = cli("monitor", "report", "--logs", root)
    assert code == 0
    (row,) = [line for line in out.splitlines() if "evil.example" in line]
    assert row.count(" | ") == 2  # version, tags, finish reasons: no extra column
    assert (
        "<" not in row.replace("\\<", "")
        and "![" not in row
        and "\\<img" in row
        and "\\!\\[t\\]" in row
    )
    assert "x \\| y" in row and "\\# h" in row
