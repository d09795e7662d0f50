"""A durable append-only journal of rows, per process, with group commit, compacted elsewhere.

    <directory>/<name>-<uuid>-<seq>.jsonl      one JSON row a line, appended and fsynced

`append(row)` queues a row and returns a Future. One committer thread writes every row queued
meanwhile with one write and one fsync, then resolves their futures: concurrent callers share
an fsync (group commit), and a caller whose future resolved knows its row survives a kill of
the process (and, fsync being what it is, a power cut).

`flush()` seals the segment being appended to and hands each sealed segment's rows to
`compact(stem, rows)` (the request log writes them as Parquet under the segment's own stem),
then deletes the segment. A crash between the two leaves the segment in place: compacting it
again rewrites the same files with the same rows, so a row never lands twice.

Each segment is `flock`ed by its writer from before it is visible until it is deleted. A
segment whose lock can be taken belongs to a process that died: `flush()` compacts those too,
so a restarted process (any process on the same directory) replays what a killed one had
acknowledged. The directory must be local and outlive the process.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

from lmforge import LmforgeError

log = logging.getLogger(__name__)
SUFFIX = ".jsonl"
TMP = ".tmp-"  # a segment before it is locked and renamed: never holds an acknowledged row


class _Segment:
    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd
        self.rows = 0  # acknowledged rows in it
        self.first: float | None = None  # monotonic time of its first row


class Journal:
    """Durable rows of one process under `directory`; see the module docstring."""

    def __init__(
        self,
        directory: str,
        name: str,
        flush_rows: int,
        compact: Callable[[str, list[dict]], None],
        on_full: Callable[[], None] | None = None,
    ) -> None:
        self.directory, self.flush_rows = directory, flush_rows
        self.compact, self.on_full = compact, on_full
        os.makedirs(directory, exist_ok=True)
        self.prefix, self.seq = f"{name}-{uuid.uuid4().hex[:12]}", 0
        self.active: _Segment | None = None  # appended to
        self.pending: list[_Segment] = []  # sealed, not yet compacted
        self.written = self.torn = 0  # rows compacted; unreadable lines skipped
        self._queue: list[tuple[bytes, cf.Future]] = []
        self._cond = threading.Condition()
        self._segment_lock = threading.Lock()  # the active segment
        self._flushing = threading.Lock()  # one flush at a time
        self._stopped = False
        self._thread = threading.Thread(target=self._commit_loop, name="lmforge-journal")
        self._thread.daemon = True
        self._thread.start()

    def append(self, row: dict) -> cf.Future:
        """Queue `row`; the Future resolves (None) once it is fsynced, or raises the OSError
        that kept it from disk."""
        line = json.dumps(row, default=_encode, ensure_ascii=False).encode() + b"\n"
        future: cf.Future = cf.Future()
        with self._cond:
            if self._stopped:
                raise LmforgeError("the feedback journal is closed")
            self._queue.append((line, future))
            self._cond.notify()
        return future

    def buffered(self) -> int:
        """Acknowledged rows not yet compacted."""
        active = self.active.rows if self.active else 0
        return active + sum(s.rows for s in self.pending)

    @property
    def first_buffered(self) -> float | None:
        return self.active.first if self.active else None

    # ------------------------------------------------------------ commit

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            error = self._commit(b"".join(line for line, _ in batch), len(batch))
            for _, future in batch:
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
            if error is None and self.on_full and self.buffered() >= self.flush_rows:
                self.on_full()

    def _commit(self, data: bytes, rows: int) -> OSError | None:
        with self._segment_lock:
            try:
                if self.active is None:
                    self.active = self._open()
                segment, view = self.active, memoryview(data)
                while view:
                    view = view[os.write(segment.fd, view) :]
                os.fsync(segment.fd)
            except OSError as e:
                # A write that failed half-way may leave a torn line at the end: seal the
                # segment there (compaction skips the torn line), so no row follows it.
                log.warning("could not append to the feedback journal in %s: %s", self.directory, e)
                if self.active is not None:
                    self.pending.append(self.active)
                    self.active = None
                return e
            segment.rows += rows
            segment.first = segment.first or time.monotonic()
            return None

    def _open(self) -> _Segment:
        name = f"{self.prefix}-{self.seq:06d}{SUFFIX}"
        self.seq += 1
        tmp, path = os.path.join(self.directory, TMP + name), os.path.join(self.directory, name)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the segment is compacted and deleted
            os.rename(tmp, path)  # locked before it is visible: recovery never takes it
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        return _Segment(path, fd)

    # ------------------------------------------------------------ compaction

    def flush(self) -> int:
        """Seal the active segment, compact every sealed one and every segment whose writer
        died; return the rows compacted. Raises on a storage error (what was not compacted
        stays on disk, sealed, for the next flush)."""
        with self._flushing:
            with self._segment_lock:
                if self.active is not None and self.active.rows:
                    self.pending.append(self.active)
                    self.active = None
            count = 0
            while self.pending:
                segment = self.pending[0]
                count += self._compact(segment.path, segment.fd)
                os.unlink(segment.path)
                os.close(segment.fd)  # the lock goes with it
                self.pending.pop(0)
            return count + self.recover()

    def recover(self) -> int:
        """Compact the segments of writers that died (their lock is free); return their rows."""
        own = {s.path for s in self.pending} | ({self.active.path} if self.active else set())
        count = 0
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if path in own or not name.endswith(SUFFIX) or _fresh_tmp(path, name):
                continue
            try:
                fd = os.open(path, os.O_RDWR)  # RDWR: an exclusive lock on NFS needs it
            except FileNotFoundError:
                continue  # compacted meanwhile by its writer
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # its writer is alive
            try:
                if os.fstat(fd).st_nlink == 0:
                    continue  # its writer compacted and deleted it while we waited to open it
                if not name.startswith(TMP):
                    count += self._compact(path, fd)
                    log.info("replayed the feedback journal segment %s", path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            finally:
                os.close(fd)
        return count

    def _compact(self, path: str, fd: int) -> int:
        rows, torn = decode(_read_all(fd))
        if torn:
            self.torn += torn
            log.warning("%s: skipped %d unreadable (torn) lines", path, torn)
        if rows:
            self.compact(os.path.basename(path)[: -len(SUFFIX)], rows)
        self.written += len(rows)
        return len(rows)

    def stop(self) -> None:
        """Refuse new rows and commit those queued (their callers get their answer)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


def decode(data: bytes) -> tuple[list[dict], int]:
    """The rows of a segment, and how many lines could not be read (a write torn by a crash
    or a full disk; never an acknowledged row: those were fsynced whole)."""
    rows, torn = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            torn += 1
    return rows, torn


def _encode(value):
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"cannot journal a {type(value).__name__}")


def _read_all(fd: int) -> bytes:
    parts, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _fresh_tmp(path: str, name: str) -> bool:
    """A temp segment of a live writer may not be locked yet (it is, a moment after its
    creation): only one a minute old is an orphan."""
    try:
        return name.startswith(TMP) and time.time() - os.stat(path).st_mtime < 60
    except FileNotFoundError:
        return True


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
