"""The request log and feedback store without Ray: batches, flush triggers, retries, redaction."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pyarrow.parquet as pq
import pytest

from lmforge import LmforgeError, storage
from lmforge.serve.logreader import read_log
from lmforge.serve.requestlog import (
    FEEDBACK_SCHEMA,
    REQUEST_SCHEMA,
    LogWriter,
    RequestLog,
    sampled,
    utcnow,
)


def feedback_row(i: int, replica: int = 0, **extra) -> dict:
    return {
        "feedback_id": f"fb-{replica}-{i}",
        "completion_id": f"chatcmpl-{i}",
        "time": utcnow(),
        "rating": 1.0 if i % 2 else -1.0,
        "correction": None,
        "tags": ["t"],
        "model": "tiny",
        "model_version": "v-1",
        **extra,
    }


def request_row(i: int, **extra) -> dict:
    return {
        "completion_id": f"cmpl-{i}",
        "time": utcnow(),
        "endpoint": "completions",
        "model": "tiny",
        "model_version": "v-1",
        "messages_json": None,
        "prompt": "hello",
        "completion": "world",
        "finish_reason": "length",
        "latency_s": 0.5,
        "prompt_tokens": 2,
        "completion_tokens": 1,
        "status": 200,
        **extra,
    }


def test_concurrent_feedback_from_several_replicas_is_all_on_disk_once(tmp_path):
    """4 replicas (writer instances) x 3 threads each x 250 rows, small batches so that the
    size trigger, the timer and the final flush all write: every row is on disk exactly once."""
    logs = [
        RequestLog(str(tmp_path), flush_rows=40, flush_seconds=0.05, replica=f"r{k}")
        for k in range(4)
    ]

    def send(k: int, t: int) -> None:
        for i in range(250):
            logs[k].record_feedback(feedback_row(t * 1000 + i, replica=k))

    threads = [threading.Thread(target=send, args=(k, t)) for k in range(4) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log.close()
    table = read_log(str(tmp_path), "feedback")
    ids = table["feedback_id"].to_pylist()
    assert len(ids) == 4 * 3 * 250 and len(set(ids)) == len(ids)
    assert table.schema == FEEDBACK_SCHEMA
    files = storage.list_files(str(tmp_path / "feedback"), suffix=".parquet")
    day = utcnow().strftime("%Y-%m-%d")
    assert len(files) > 4 and all(f"/date={day}/r" in f for f in files)
    assert sum(log.writers["feedback"].written for log in logs) == 3000


def test_a_failed_write_is_retried_under_the_same_name_never_duplicated(tmp_path, monkeypatch):
    writer = LogWriter(str(tmp_path), "requests", replica="r0", flush_rows=10)
    real = storage.write_bytes
    calls = []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 1:
            raise OSError("disk on fire")
        real(path, data)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    for i in range(3):
        writer.add(request_row(i))
    with pytest.raises(OSError, match="disk on fire"):
        writer.flush()
    assert writer.buffered() == 3  # still held, now as a sealed batch
    writer.add(request_row(3))
    assert writer.flush() == 4
    assert calls[0] == calls[1]  # the retry wrote the batch under its first name
    assert writer.buffered() == 0 and writer.flush() == 0
    ids = read_log(str(tmp_path), "requests")["completion_id"].to_pylist()
    assert sorted(ids) == ["cmpl-0", "cmpl-1", "cmpl-2", "cmpl-3"]
    assert len(storage.list_files(str(tmp_path), suffix=".parquet")) == 2


def test_the_flush_thread_retries_a_failed_batch_a_period_later(tmp_path, monkeypatch):
    real, failures = storage.write_bytes, []

    def failing_once(path, data):
        if not failures:
            failures.append(path)
            raise OSError("bucket unavailable")
        real(path, data)

    monkeypatch.setattr(storage, "write_bytes", failing_once)
    log = RequestLog(str(tmp_path), flush_rows=1, flush_seconds=0.2, replica="r0")
    log.record_feedback(feedback_row(1))
    deadline = time.monotonic() + 5
    while read_log(str(tmp_path), "feedback").num_rows == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failures and read_log(str(tmp_path), "feedback").num_rows == 1
    assert log.close() == 0


def test_rows_are_flushed_on_time_without_close(tmp_path):
    log = RequestLog(str(tmp_path), flush_rows=1000, flush_seconds=0.2, replica="r0")
    log.record_feedback(feedback_row(1))
    assert read_log(str(tmp_path), "feedback").num_rows == 0
    deadline = time.monotonic() + 5
    while read_log(str(tmp_path), "feedback").num_rows == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_log(str(tmp_path), "feedback")["feedback_id"].to_pylist() == ["fb-0-1"]
    assert log.close() == 0  # nothing was left to write


def test_a_full_batch_is_written_at_once_by_the_flush_thread(tmp_path):
    log = RequestLog(str(tmp_path), flush_rows=5, flush_seconds=3600, replica="r0")
    for i in range(5):
        log.record_request(request_row(i))
    deadline = time.monotonic() + 5
    while read_log(str(tmp_path), "requests").num_rows < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_log(str(tmp_path), "requests").num_rows == 5
    log.close()


def test_personal_data_is_redacted_in_every_text_field(tmp_path):
    log = RequestLog(str(tmp_path), replica="r0")
    messages = '[{"role": "user", "content": "write to jane.doe@example.com or +1 (555) 123-4567"}]'
    log.record_request(
        request_row(
            1,
            endpoint="chat",
            messages_json=messages,
            prompt="mail jane.doe@example.com",
            completion="call +1 (555) 123-4567 from 8.8.8.8",
        )
    )
    log.record_feedback(feedback_row(1, correction="reach me at bob@corp.org, 020 7946 0958"))
    log.close()
    (req,) = read_log(str(tmp_path), "requests").to_pylist()
    assert req["prompt"] == "mail <EMAIL>"
    assert req["completion"] == "call <PHONE> from <IP_ADDRESS>"
    assert req["messages_json"] == '[{"role": "user", "content": "write to <EMAIL> or <PHONE>"}]'
    (fb,) = read_log(str(tmp_path), "feedback").to_pylist()
    assert fb["correction"] == "reach me at <EMAIL>, <PHONE>"
    raw = b"".join(storage.read_bytes(f) for f in storage.list_files(str(tmp_path)))
    assert b"example.com" not in raw and b"7946" not in raw
    kept = RequestLog(str(tmp_path / "raw"), redact_pii=False, replica="r0")
    kept.record_feedback(feedback_row(2, correction="bob@corp.org"))
    kept.close()
    assert read_log(str(tmp_path / "raw"), "feedback")["correction"].to_pylist() == ["bob@corp.org"]


def test_sampling_is_a_reproducible_fraction_of_completion_ids(tmp_path):
    ids = [f"cmpl-{i}" for i in range(4000)]
    picked = [i for i in ids if sampled(i, 0.25)]
    assert 850 < len(picked) < 1150 and picked == [i for i in ids if sampled(i, 0.25)]
    assert all(sampled(i, 1.0) for i in ids[:10]) and not any(sampled(i, 0.0) for i in ids[:10])
    log = RequestLog(str(tmp_path), sample_rate=0.25, replica="r0")
    logged = [i for i in range(400) if log.record_request(request_row(i))]
    log.close()
    assert [f"cmpl-{i}" for i in logged] == [
        f"cmpl-{i}" for i in range(400) if f"cmpl-{i}" in picked
    ]
    assert read_log(str(tmp_path), "requests").num_rows == len(logged)


def test_read_log_filters_by_time_and_partition_and_keeps_the_schema(tmp_path):
    old = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    writer = LogWriter(str(tmp_path), "requests", replica="r0")
    writer.add(request_row(1, time=old))
    writer.add(request_row(2, time=old + dt.timedelta(days=1)))
    writer.add(request_row(3, time=old + dt.timedelta(days=1, hours=5)))
    writer.flush()
    days = sorted(p.name for p in (tmp_path / "requests").iterdir())
    assert days == ["date=2026-01-01", "date=2026-01-02"]
    all_rows = read_log(str(tmp_path), "requests")
    assert all_rows.schema == REQUEST_SCHEMA and all_rows.num_rows == 3
    since = read_log(str(tmp_path), "requests", since=dt.datetime(2026, 1, 2, 13))  # naive: UTC
    assert since["completion_id"].to_pylist() == ["cmpl-3"]
    assert read_log(str(tmp_path), "feedback").num_rows == 0
    assert read_log(str(tmp_path / "nothing"), "feedback").schema == FEEDBACK_SCHEMA
    with pytest.raises(LmforgeError, match="'requests' or 'feedback'"):
        read_log(str(tmp_path), "replies")
    with pytest.raises(LmforgeError, match="lacks completion_id"):
        writer.add(request_row(4, completion_id=None))
    file = storage.list_files(str(tmp_path), suffix=".parquet")[0]
    assert pq.read_schema(file).names == REQUEST_SCHEMA.names


def test_object_store_uris_work_too():
    root = "memory://lmforge-test-log"
    log = RequestLog(root, replica="r0")
    log.record_feedback(feedback_row(7))
    log.close()
    assert read_log(root, "feedback")["feedback_id"].to_pylist() == ["fb-0-7"]
