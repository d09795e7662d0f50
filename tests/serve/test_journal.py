"""Durable feedback: the journal's group commit, and replay after a writer is SIGKILLed (a real
child process), also between a Parquet write and its segment's deletion, and for an object
store log (a local spool, uploaded by the next process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from lmforge import ConfigError, storage
from lmforge.serve.command import load_serve_args
from lmforge.serve.journal import Journal, decode
from lmforge.serve.logreader import read_log
from lmforge.serve.requestlog import RequestLog, spool_dir

# A child that stores feedback from 4 threads, says which rows were acknowledged, then is
# SIGKILLed by itself: no flush, no atexit. KILL_IN_UNLINK kills it instead inside the first
# deletion of a journal segment, that is right after that segment's Parquet files were written.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    from lmforge.serve.requestlog import RequestLog, utcnow
    root, spool, n, kill_in_unlink = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    log = RequestLog(root, flush_rows=10**6, flush_seconds=3600, replica="dead", spool=spool)
    out = threading.Lock()
    def store(t):
        for i in range(n):
            row = {"feedback_id": f"fb-{t}-{i}", "completion_id": "c", "time": utcnow(),
                   "rating": 1.0, "correction": "x@y.org"}
            log.record_feedback(row)
            with out:
                print(row["feedback_id"], flush=True)
    threads = [threading.Thread(target=store, args=(t,)) for t in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    if kill_in_unlink:
        real = os.unlink
        def unlink(path, *a, **k):
            if path.endswith(".jsonl"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, *a, **k)
        os.unlink = unlink
        log.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_killed_writer(root: str, spool: str, n: int, kill_in_unlink: bool = False) -> list[str]:
    """The feedback ids a SIGKILLed child acknowledged."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", CHILD, root, spool, str(n), "1" if kill_in_unlink else "0"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == -9, done.stderr
    return done.stdout.split()


def test_acknowledged_feedback_survives_sigkill_and_is_replayed_once(tmp_path):
    root, spool = str(tmp_path / "log"), str(tmp_path / "spool")
    acked = run_killed_writer(root, spool, 50)
    assert len(acked) == 200
    assert read_log(root, "feedback").num_rows == 0  # nothing compacted: all in the journal
    assert len(os.listdir(os.path.join(spool, "feedback"))) == 1
    log = RequestLog(root, flush_seconds=3600, replica="next", spool=spool)
    deadline = time.monotonic() + 30  # the new replica replays at start, not at close
    while read_log(root, "feedback").num_rows < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = read_log(root, "feedback").to_pylist()
    assert sorted(r["feedback_id"] for r in rows) == sorted(acked)
    assert {r["replica"] for r in rows} == {"dead"} and {r["correction"] for r in rows} == {
        "<EMAIL>"
    }
    assert os.listdir(os.path.join(spool, "feedback")) == []
    assert log.close() == 0


def test_a_kill_between_parquet_and_segment_deletion_duplicates_nothing(tmp_path):
    root, spool = str(tmp_path / "log"), str(tmp_path / "spool")
    acked = run_killed_writer(root, spool, 10, kill_in_unlink=True)
    (file,) = storage.list_files(root, suffix=".parquet")  # written before the kill
    assert read_log(root, "feedback").num_rows == 40
    assert len(os.listdir(os.path.join(spool, "feedback"))) == 1  # and still journaled
    RequestLog(root, flush_seconds=3600, replica="next", spool=spool).close()
    assert storage.list_files(root, suffix=".parquet") == [file]  # rewritten under its name
    ids = read_log(root, "feedback")["feedback_id"].to_pylist()
    assert sorted(ids) == sorted(acked) and len(set(ids)) == 40


def test_an_object_store_log_spools_locally_and_uploads_after_a_restart(tmp_path):
    """The child's memory:// store dies with it (nothing was uploaded); its spool does not."""
    root, spool = "memory://lmforge-journal-test", str(tmp_path / "spool")
    acked = run_killed_writer(root, spool, 25)
    log = RequestLog(root, flush_seconds=3600, replica="next", spool=spool)
    log.close()
    ids = read_log(root, "feedback")["feedback_id"].to_pylist()
    assert sorted(ids) == sorted(acked) and len(ids) == 100
    assert storage.list_files(root + "/feedback")[0].startswith(root + "/feedback/date=")


def test_the_spool_of_an_object_store_log_is_local():
    default = spool_dir("s3://bucket/logs")
    assert default.startswith(os.environ["LMFORGE_HOME"]) and "s3---bucket-logs" in default
    assert spool_dir("s3://bucket/logs") != spool_dir("s3://bucket/other")
    assert spool_dir("/data/log") == "/data/log/_spool"
    overrides = ["request_log.path=s3://b/l", "request_log.spool_dir=s3://b/spool"]
    with pytest.raises(ConfigError, match="'request_log.spool_dir': .*must be a local directory"):
        load_serve_args(None, overrides, "/some/artifact")


def test_concurrent_appends_share_fsyncs(tmp_path, monkeypatch):
    """Group commit: 16 threads x 20 rows with a 5 ms fsync take far fewer fsyncs than rows."""
    real, fsyncs = os.fsync, []

    def slow_fsync(fd):
        fsyncs.append(fd)
        time.sleep(0.005)
        real(fd)

    compacted: list[dict] = []
    journal = Journal(str(tmp_path), "r0", 10**6, lambda stem, rows: compacted.extend(rows))
    monkeypatch.setattr(os, "fsync", slow_fsync)

    def append(t: int) -> None:
        for i in range(20):
            journal.append({"id": f"{t}-{i}"}).result()

    threads = [threading.Thread(target=append, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert journal.buffered() == 320
    assert len(fsyncs) < 320 / 3
    journal.stop()
    assert journal.flush() == 320 and len({r["id"] for r in compacted}) == 320


def test_a_failed_append_raises_and_later_rows_do_not_follow_a_torn_line(tmp_path, monkeypatch):
    journal = Journal(str(tmp_path), "r0", 10**6, lambda stem, rows: None)
    journal.append({"id": "a"}).result()
    real_write = os.write

    def torn_write(fd, data):
        real_write(fd, bytes(data)[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", torn_write)
    with pytest.raises(OSError, match="No space left"):
        journal.append({"id": "b"}).result()
    monkeypatch.setattr(os, "write", real_write)
    journal.append({"id": "c"}).result()
    segments = sorted(os.listdir(tmp_path))
    assert len(segments) == 2  # the torn one was sealed; "c" went to a new one
    first = decode((tmp_path / segments[0]).read_bytes())
    assert first == ([{"id": "a"}], 1)
    journal.stop()
    assert journal.flush() == 2 and journal.torn == 1
