"""Reading one listed file into documents, record by record, so bad input is quarantined,
not fatal. `read_file` turns one file that data/sources.py listed into batches of rows:

    id (int64)  source  path  line  text  reject  step  copies

`line` is the 1-based line (jsonl, txt lines), first line (paragraphs), element or row number
(json arrays, parquet, csv) or 1 (a whole-file document). A record that cannot be a document
(bad JSON, invalid UTF-8, missing or non-string field, empty, larger than max_record_mb) is a
row with `reject` set to the reason, `step` = "read" and `text` = a short snippet of the raw
record; the rest of the file is still read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from lmforge import storage
from lmforge.builtin import corpus
from lmforge.data.config import SourceConfig
from lmforge.data.sources import COMPRESSION

SNIPPET_CHARS = 200
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("line", pa.int64()),
        ("text", pa.large_string()),
        ("reject", pa.string()),
        ("step", pa.string()),
        ("copies", pa.int32()),
    ]
)


def doc_id(source: str, relpath: str, line: int) -> int:
    """A stable 63-bit id from where the document comes from (not its absolute path)."""
    digest = hashlib.blake2b(f"{source}\0{relpath}\0{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class _Rows:
    """Accumulates rows of one file and hands them out in batches."""

    def __init__(self, src: SourceConfig, item: dict[str, Any], batch_size: int) -> None:
        self.src, self.item, self.batch_size = src, item, batch_size
        self.cols: dict[str, list] = {name: [] for name in SCHEMA.names}

    def add(self, line: int, text: str, reject: str = "") -> pa.Table | None:
        label, rel = self.src.label, self.item["relpath"]
        i = doc_id(label, rel, line)
        copies = int(self.src.weight) + ((i % 1_000_003) / 1_000_003 < self.src.weight % 1)
        if not reject and copies == 0:
            reject = "sampled_out"
        row = (
            i,
            label,
            rel,
            line,
            text if not reject else text[:SNIPPET_CHARS],
            reject,
            "read" if reject else "",
            copies,
        )
        for name, value in zip(SCHEMA.names, row, strict=True):
            self.cols[name].append(value)
        return self.flush() if len(self.cols["id"]) >= self.batch_size else None

    def flush(self) -> pa.Table | None:
        if not self.cols["id"]:
            return None
        table = pa.table(self.cols, schema=SCHEMA)
        self.cols = {name: [] for name in SCHEMA.names}
        return table


def read_file(
    src: SourceConfig, item: dict[str, Any], max_record_bytes: int, batch_size: int
) -> Iterator[pa.Table]:
    rows = _Rows(src, item, batch_size)
    records = _RECORDS[item["format"]](src, item, max_record_bytes)
    for line, text, reject in records:
        if not reject and not text.strip():
            reject = "empty"
        if (table := rows.add(line, text, reject)) is not None:
            yield table
    if (table := rows.flush()) is not None:
        yield table


def _open(path: str) -> io.BufferedReader:
    fs, inner = storage.resolve(path)
    return io.BufferedReader(fs.open_input_stream(inner, compression="detect"), 1 << 20)


def _decode(raw: bytes) -> tuple[str, str]:
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), "invalid_utf8"


def _lines(path: str, limit: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without newline, too_large) for each line; a too-large line is
    skipped through in chunks, never held whole."""
    with _open(path) as f:
        n = 0
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                return
            n += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                head = raw[:SNIPPET_CHARS]
                while (chunk := f.readline(1 << 20)) and not chunk.endswith(b"\n"):
                    pass
                yield n, head, True
                continue
            yield n, raw.rstrip(b"\r\n"), False


def _json_record(value: Any, field: str, raw: str) -> tuple[str, str]:
    if not isinstance(value, dict):
        return raw, "not_an_object"
    if field not in value or value[field] is None:
        return raw, "missing_field"
    if not isinstance(value[field], str):
        return raw, "non_string_field"
    return value[field], ""


def _jsonl_records(src, item, limit) -> Iterator[tuple[int, str, str]]:
    for n, raw, too_large in _lines(item["path"], limit):
        if too_large:
            yield n, _decode(raw)[0], "record_too_large"
            continue
        text, bad = _decode(raw)
        if bad:
            yield n, text, bad
            continue
        if not text.strip():
            continue  # blank lines between records are not records
        try:
            value = json.loads(text)
        except ValueError:
            yield n, text, "bad_json"
            continue
        yield n, *_json_record(value, src.text_field, text)


def _json_records(src, item, limit) -> Iterator[tuple[int, str, str]]:
    with _open(item["path"]) as f:
        head = f.peek(64)[:64].lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_records(src, item, limit)
        return
    data = (
        storage.read_bytes(item["path"])
        if not item["path"].endswith(COMPRESSION)
        else _open(item["path"]).read()
    )
    text, bad = _decode(data)
    try:
        values = json.loads(text) if not bad else None
    except ValueError:
        bad = "bad_json"
    if bad:
        yield 1, text[:SNIPPET_CHARS], bad
        return
    for n, value in enumerate(values, 1):
        yield n, *_json_record(value, src.text_field, json.dumps(value)[:SNIPPET_CHARS])


def _txt_records(src, item, limit) -> Iterator[tuple[int, str, str]]:
    if src.txt_mode == "line":
        for n, raw, too_large in _lines(item["path"], limit):
            text, bad = _decode(raw)
            if too_large or bad or text.strip():
                yield n, text, "record_too_large" if too_large else bad
        return
    if src.txt_mode == "file":
        yield _whole_file(item["path"], limit, _decode)
        return
    para: list[str] = []
    start, bad, size = 0, "", 0
    for n, raw, too_large in _lines(item["path"], limit):
        text, line_bad = _decode(raw)
        if text.strip() and not too_large:
            if not para:
                start, bad, size = n, "", 0
            para.append(text)
            size += len(raw)
            bad = bad or line_bad or ("record_too_large" if size > limit else "")
            continue
        if para:
            yield start, "\n".join(para), bad
            para = []
        if too_large:
            yield n, text, "record_too_large"
    if para:
        yield start, "\n".join(para), bad


def _arrow_batches(path: str) -> Iterator[pa.RecordBatch]:
    """Record batches of an Arrow IPC file: the stream format (what Hugging Face datasets'
    `save_to_disk` writes), or the random-access file format."""
    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            file_reader = pa.ipc.open_file(f)
            for i in range(file_reader.num_record_batches):
                yield file_reader.get_batch(i)
            return
        yield from reader


def _arrow_records(src, item, limit) -> Iterator[tuple[int, str, str]]:
    n = 0
    for batch in _arrow_batches(item["path"]):
        if src.text_field not in batch.schema.names:
            for _ in range(batch.num_rows):
                n += 1
                yield n, "", "missing_field"
            continue
        for value in batch.column(src.text_field).to_pylist():
            n += 1
            yield n, *_value_record(value, limit)


def _parquet_records(src, item, limit) -> Iterator[tuple[int, str, str]]:
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(item["path"])
    pf = pq.ParquetFile(fs.open_input_file(inner))
    if src.text_field not in pf.schema_arrow.names:
        for n in range(1, pf.metadata.num_rows + 1):
            yield n, "", "missing_field"
        return
    n = 0
    for batch in pf.iter_batches(columns=[src.text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            n += 1
            yield n, *_value_record(value, limit)


def _value_record(value: Any, limit: int) -> tuple[str, str]:
    if value is None:
        return "", "missing_field"
    if not isinstance(value, str):
        return str(value)[:SNIPPET_CHARS], "non_string_field"
    if len(value) > limit:
        return value[:SNIPPET_CHARS], "record_too_large"
    return value, ""


def _csv_records(src, item, limit) -> Iterator[tuple[int, str, str]]:
    csv.field_size_limit(max(limit, 1 << 20))
    with io.TextIOWrapper(
        _open(item["path"]), encoding="utf-8", errors="surrogateescape", newline=""
    ) as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                n = reader.line_num
                text, bad = _value_record(row.get(src.text_field), limit)
                if not bad and any("\udc80" <= ch <= "\udcff" for ch in text):
                    text, bad = (
                        text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                        "invalid_utf8",
                    )
                yield n, text, bad
        except csv.Error as e:
            yield reader.line_num + 1, str(e), "bad_csv"


def _main_text(html: bytes) -> tuple[str, str]:
    """The main text of an HTML page by trafilatura (boilerplate, menus, footers removed)."""
    import trafilatura

    text = trafilatura.extract(html, include_comments=False, include_tables=True)
    return (
        (text, "") if text and text.strip() else (_decode(html[:SNIPPET_CHARS])[0], "no_main_text")
    )


def _html_records(src, item, limit) -> Iterator[tuple[int, str, str]]:
    yield _whole_file(item["path"], limit, _main_text)


def _whole_file(path: str, limit: int, to_text) -> tuple[int, str, str]:
    """A file that is one document: (1, to_text(bytes)...), or a snippet and `record_too_large`
    when it is over `limit` bytes (read no further than limit + 1 to know)."""
    with _open(path) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        return 1, _decode(raw[:SNIPPET_CHARS])[0], "record_too_large"
    return 1, *to_text(raw)


def _warc_records(src, item, limit) -> Iterator[tuple[int, str, str]]:
    """One document per HTML response record; `line` is the record's number in the archive.
    Other records (requests, metadata, non-HTML responses) are not documents."""
    from warcio.archiveiterator import ArchiveIterator

    fs, inner = storage.resolve(item["path"])
    with fs.open_input_stream(inner) as raw:  # warcio undoes the per-record gzip itself
        for n, record in enumerate(ArchiveIterator(io.BufferedReader(raw, 1 << 20)), 1):
            if record.rec_type != "response":
                continue
            ctype = (
                record.http_headers.get_header("Content-Type", "") if record.http_headers else ""
            )
            if "html" not in ctype.lower():
                continue
            body = record.content_stream().read(limit + 1)
            if len(body) > limit:
                yield n, _decode(body[:SNIPPET_CHARS])[0], "record_too_large"
            else:
                yield n, *_main_text(body)


def _builtin_records(src, item, limit) -> Iterator[tuple[int, str, str]]:
    for n, text in corpus.python_docs_records(item["relpath"]):
        yield n, text, ("record_too_large" if len(text) > limit else "")


_RECORDS = {
    "jsonl": _jsonl_records,
    "json": _json_records,
    "txt": _txt_records,
    "parquet": _parquet_records,
    "arrow": _arrow_records,
    "html": _html_records,
    "warc": _warc_records,
    "csv": _csv_records,
    "builtin": _builtin_records,
}
