"""The request log and the feedback store: what was asked, what was answered, what users said.

    <path>/requests/date=YYYY-MM-DD/<replica>-<uuid>-<seq>.parquet   sampled requests
    <path>/feedback/date=YYYY-MM-DD/<replica>-<uuid>-<seq>.parquet   every feedback record

Each API replica buffers request rows and writes them in batches: when `flush_rows` are
buffered, every `flush_seconds` (a background thread), and at shutdown. A batch gets its file
name when it is sealed and is dropped from memory only after that file is durable (written
atomically through lmforge.storage), so a retry after a failed write rewrites the same file:
never a duplicate. A killed replica loses the request rows it buffered (best effort).

Feedback is durable (`durable_feedback`): a row is fsynced to the replica's journal
(lmforge.serve.journal: group commit, in a local spool) before `record_feedback` returns, and
the same flush triggers compact the journal into the Parquet layout above, the file named after
its journal segment, so compacting a segment twice (a crash in between) writes no duplicate.
A restarted replica compacts (uploads, for an object store) the segments a killed one left.
Text fields go through the data pipeline's `pii` step first (`redact_pii`).

`lmforge.serve.logreader.read_log(path, kind, since)` is how the monitor report and the
improvement job read them.
No Ray in here: the writer runs (and is tested) in any process.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import datetime as dt
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge import LmforgeError, storage
from lmforge.serve.journal import Journal, fsync_dir

log = logging.getLogger(__name__)

TIME = pa.timestamp("us", tz="UTC")

REQUEST_SCHEMA = pa.schema(
    [
        pa.field("completion_id", pa.string(), nullable=False),  # the OpenAI response id
        pa.field("time", TIME, nullable=False),  # when the request arrived
        pa.field("endpoint", pa.string(), nullable=False),  # "chat" | "completions"
        pa.field("model", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("messages_json", pa.string()),  # chat: the messages as JSON; else null
        pa.field("prompt", pa.string()),  # the rendered prompt text (the first, if several)
        pa.field("completion", pa.string()),  # the first choice's text
        pa.field("finish_reason", pa.string()),
        pa.field("latency_s", pa.float64()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),  # over every choice (as `usage`)
        pa.field("status", pa.int32()),  # the HTTP status (a failed stream: its error's)
        pa.field("replica", pa.string()),
    ]
)

FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("feedback_id", pa.string(), nullable=False),
        pa.field("completion_id", pa.string(), nullable=False),
        pa.field("time", TIME, nullable=False),
        pa.field("rating", pa.float64(), nullable=False),  # [-1, 1]: +1 thumbs up, -1 down
        pa.field("correction", pa.string()),  # the answer the user wanted, if given
        pa.field("tags", pa.list_(pa.string())),
        pa.field("model", pa.string()),  # null when this replica did not see the completion
        pa.field("model_version", pa.string()),
        pa.field("replica", pa.string()),
        pa.field("key_id", pa.string()),  # the id of the API key that sent it (never the key)
        pa.field("trusted", pa.bool_()),  # from a key in trusted_keys: it may feed `improve`
    ]
)

SCHEMAS = {"requests": REQUEST_SCHEMA, "feedback": FEEDBACK_SCHEMA}
REDACTED = {"requests": ("prompt", "completion"), "feedback": ("correction",)}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sampled(completion_id: str, rate: float) -> bool:
    """Whether a completion is in the sample: a hash of its id, so the choice is reproducible
    (and the same on every replica), with `rate` the fraction kept."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(completion_id.encode()).digest()[:8], "big")
    return h / 2**64 < rate


def default_replica() -> str:
    """This process's name in file names: the Serve replica id when in one, else host-pid."""
    try:
        from ray import serve

        return _safe(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return _safe(f"{socket.gethostname()}-{os.getpid()}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:80]


class Redactor:
    """The data pipeline's `pii` step (emails, phone numbers, IPs) over log text fields."""

    def __init__(self) -> None:
        from lmforge.data.steps import Pii, PiiConfig

        self.step = Pii(PiiConfig(step="pii"))

    def __call__(self, text: str | None) -> str | None:
        return None if text is None else self.step.process(text).text

    def messages(self, messages: list[dict]) -> list[dict]:
        return [{**m, "content": self(m.get("content"))} for m in messages]


# ---------------------------------------------------------------- the writer


class _Batch:
    """Rows sealed under one file name per date; kept until every file of it is written."""

    def __init__(self, rows: list[dict], name: str) -> None:
        self.name, self.by_date = name, {}
        for row in rows:
            self.by_date.setdefault(row["time"].strftime("%Y-%m-%d"), []).append(row)


class LogWriter:
    """Buffered, batched, atomic parquet writer of one kind of rows ("requests"/"feedback")."""

    def __init__(
        self,
        root: str,
        kind: Literal["requests", "feedback"],
        replica: str | None = None,
        flush_rows: int = 1000,
        max_buffer_rows: int | None = None,
    ) -> None:
        if kind not in SCHEMAS:
            raise LmforgeError(f"log kind must be 'requests' or 'feedback', not {kind!r}")
        self.root, self.kind, self.schema = root, kind, SCHEMAS[kind]
        self.replica = _safe(replica) if replica else default_replica()
        self.flush_rows = flush_rows
        self.max_buffer_rows = max_buffer_rows or max(100 * flush_rows, 10_000)
        self.prefix = f"{self.replica}-{uuid.uuid4().hex[:12]}"
        self.buffer: list[dict] = []
        self.pending: list[_Batch] = []  # sealed, not yet (fully) written
        self.seq, self.written, self.dropped = 0, 0, 0
        self._lock = threading.Lock()  # the buffer
        self._flushing = threading.Lock()  # one flush at a time, batches in order
        self.first_buffered: float | None = None

    def add(self, row: dict[str, Any]) -> bool:
        """Buffer a row; True when `flush_rows` are now buffered (the caller may flush)."""
        check_row(self.kind, row)
        with self._lock:
            if len(self.buffer) >= self.max_buffer_rows:
                self.dropped += 1  # storage is failing for long: keep memory bounded
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("%s log buffer full: %d rows dropped", self.kind, self.dropped)
                return True
            if not self.buffer:
                self.first_buffered = time.monotonic()
            self.buffer.append(row)
            return len(self.buffer) >= self.flush_rows

    def buffered(self) -> int:
        with self._lock:
            return len(self.buffer) + sum(len(r) for b in self.pending for r in b.by_date.values())

    def flush(self) -> int:
        """Write everything buffered and pending; return the rows written. Raises on a storage
        error (the rows stay pending under their file names, for the next flush)."""
        with self._flushing:
            with self._lock:
                rows, self.buffer, self.first_buffered = self.buffer, [], None
                if rows:
                    self.pending.append(_Batch(rows, f"{self.prefix}-{self.seq:06d}.parquet"))
                    self.seq += 1
            count = 0
            while self.pending:
                batch = self.pending[0]
                for date in sorted(batch.by_date):
                    write_rows(self.root, self.kind, date, batch.name, batch.by_date[date])
                    count += len(batch.by_date.pop(date))
                self.pending.pop(0)
            self.written += count
            return count


def check_row(kind: str, row: dict[str, Any]) -> None:
    missing = [f.name for f in SCHEMAS[kind] if not f.nullable and row.get(f.name) is None]
    if missing:
        raise LmforgeError(f"{kind} log row lacks {', '.join(missing)}")


def write_rows(root: str, kind: str, date: str, name: str, rows: list[dict]) -> str:
    """Write one day's rows of a kind as one Parquet file, atomically; return its path."""
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[kind]), sink)
    path = storage.join(root, kind, f"date={date}", name)
    storage.write_bytes(path, sink.getvalue())
    return path


def compact_feedback(root: str, stem: str, rows: list[dict]) -> None:
    """Journal rows (JSON) -> `<root>/feedback/date=.../<stem>.parquet`, made durable before
    the journal segment is deleted."""
    for row in rows:
        row["time"] = dt.datetime.fromisoformat(row["time"])
    for date, day in _Batch(rows, f"{stem}.parquet").by_date.items():
        path = write_rows(root, "feedback", date, f"{stem}.parquet", day)
        if storage.is_local(path):  # the rename, before the segment's unlink
            fsync_dir(os.path.dirname(storage.local_path(path)))


def spool_dir(path: str, spool: str | None = None) -> str:
    """Where a replica journals feedback: `spool`, else `<path>/_spool` for a local log, else
    a directory per log URI under $LMFORGE_HOME/spool."""
    if spool:
        return os.path.abspath(os.path.expanduser(spool))
    if storage.is_local(path):
        return os.path.join(storage.local_path(path), "_spool")
    from lmforge.cluster.local import lmforge_home

    digest = hashlib.sha256(path.encode()).hexdigest()[:12]
    return str(lmforge_home() / "spool" / f"{_safe(path)[:40]}-{digest}")


class RequestLog:
    """The request and feedback writers of one API replica, with their flush thread, the
    sampling rule, redaction, and a bounded cache of recent completions (for feedback rows).

    Closing (or the process exiting) flushes what is buffered."""

    def __init__(
        self,
        path: str | None,
        sample_rate: float = 1.0,
        flush_rows: int = 1000,
        flush_seconds: float = 60.0,
        redact_pii: bool = True,
        replica: str | None = None,
        recent_completions: int = 10_000,
        durable_feedback: bool = True,
        spool: str | None = None,
    ) -> None:
        self.path, self.sample_rate, self.flush_seconds = path, sample_rate, flush_seconds
        self.replica = _safe(replica) if replica else default_replica()
        self.redact = Redactor() if redact_pii else None
        self._wake, self._stop = threading.Event(), threading.Event()
        self.journal = None
        if path and durable_feedback:
            self.journal = Journal(
                os.path.join(spool_dir(path, spool), "feedback"),
                self.replica,
                flush_rows,
                compact=lambda stem, rows: compact_feedback(path, stem, rows),
                on_full=self._wake.set,
            )
        self.writers = {
            kind: LogWriter(path, kind, self.replica, flush_rows)
            for kind in (SCHEMAS if path else ())
        }
        if self.journal is not None:
            self.writers["feedback"] = self.journal  # same flush triggers, same retries
        self.recent: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self.recent_size = recent_completions
        self._thread: threading.Thread | None = None
        self._recent_lock = threading.Lock()
        if path:
            self._thread = threading.Thread(target=self._loop, name="lmforge-log", daemon=True)
            self._thread.start()
            atexit.register(_close_ref, weakref.ref(self))

    @property
    def enabled(self) -> bool:
        return bool(self.writers)

    def remember(self, completion_id: str, model: str, version: str | None) -> None:
        """Note which model answered `completion_id` (every completion, sampled or not)."""
        with self._recent_lock:
            self.recent[completion_id] = (model, version)
            self.recent.move_to_end(completion_id)
            while len(self.recent) > self.recent_size:
                self.recent.popitem(last=False)

    def lookup(self, completion_id: str) -> tuple[str | None, str | None]:
        with self._recent_lock:
            return self.recent.get(completion_id, (None, None))

    def record_request(self, row: dict[str, Any]) -> bool:
        """Log a request if it is in the sample; True when it was."""
        if not self.enabled or not sampled(row["completion_id"], self.sample_rate):
            return False
        row = {"replica": self.replica, **row}
        if self.redact is not None:
            for key in REDACTED["requests"]:
                row[key] = self.redact(row.get(key))
            if row.get("messages_json") is not None:
                messages = self.redact.messages(json.loads(row["messages_json"]))
                row["messages_json"] = json.dumps(messages, ensure_ascii=False)
        self._add("requests", row)
        return True

    def record_feedback(self, row: dict[str, Any]) -> bool:
        """Store a feedback record (never sampled): durable on return when `durable_feedback`
        (raises the OSError that kept it from disk); False when the log is off."""
        future = self._feedback(row)
        if future is not None:
            future.result()
        return self.enabled

    async def store_feedback(self, row: dict[str, Any]) -> bool:
        """`record_feedback` for the event loop: awaits the journal's fsync."""
        future = self._feedback(row)
        if future is not None:
            await asyncio.wrap_future(future)
        return self.enabled

    def _feedback(self, row: dict[str, Any]) -> cf.Future | None:
        if not self.enabled:
            return None
        row = {"replica": self.replica, **row}
        if self.redact is not None:
            row["correction"] = self.redact(row.get("correction"))
        if self.journal is None:
            self._add("feedback", row)
            return None
        check_row("feedback", row)
        return self.journal.append(row)

    def _add(self, kind: str, row: dict) -> None:
        if self.writers[kind].add(row):
            self._wake.set()  # the flush thread writes: never the request's own path

    def flush(self) -> int:
        total = 0
        for kind, writer in self.writers.items():
            try:
                total += writer.flush()
            except Exception as e:  # rows stay pending; the next flush retries them
                log.warning("could not write the %s log to %s: %s", kind, self.path, e)
        return total

    def _loop(self) -> None:
        if self.journal is not None:
            self.flush()  # replay at once what a killed replica acknowledged
        while not self._stop.is_set():
            woken = self._wake.wait(timeout=self._due_in())
            self._wake.clear()
            if self._stop.is_set():
                break
            full = any(w.buffered() >= w.flush_rows for w in self.writers.values())
            failed = any(w.pending for w in self.writers.values())  # retried once a period
            if full or self._due_in() <= 0 or (failed and not woken):
                self.flush()

    def _due_in(self) -> float:
        """Seconds until the oldest buffered row has waited `flush_seconds` (batches whose
        write failed are retried with the next flush, not in a tight loop)."""
        starts = [w.first_buffered for w in self.writers.values() if w.first_buffered]
        if not starts:
            return self.flush_seconds
        return max(min(starts) + self.flush_seconds - time.monotonic(), 0.0)

    def close(self) -> int:
        """Stop the flush thread and write everything buffered; return the rows written."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self.journal is not None:
            self.journal.stop()  # what was queued is committed, then compacted below
        return self.flush()


def _close_ref(ref: weakref.ref) -> None:
    request_log = ref()
    if request_log is not None and not request_log._stop.is_set():
        request_log.close()
