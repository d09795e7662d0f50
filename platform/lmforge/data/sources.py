"""Reading sources into documents, record by record, so bad input is quarantined, not fatal.

`resolve_sources` lists every file of every source before any work starts (a missing or
unreadable path is a one-line error). `read_file` then turns one file into batches of rows:

    id (int64)  source  path  line  text  reject  step  copies

`line` is the 1-based line (jsonl, txt lines), first line (paragraphs), element or row number
(json arrays, parquet, csv) or 1 (a whole-file document). A record that cannot be a document
(bad JSON, invalid UTF-8, missing or non-string field, empty, larger than max_record_mb) is a
row with `reject` set to the reason, `step` = "read" and `text` = a short snippet of the raw
record; the rest of the file is still read.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from lmforge import LmforgeError, storage
from lmforge.builtin import corpus
from lmforge.data.config import SourceConfig

SNIPPET_CHARS = 200
EXTENSIONS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".html": "html",
    ".htm": "html",
    ".warc": "warc",
}
_HF_METADATA = {"state.json", "dataset_info.json", "dataset_dict.json"}
COMPRESSION = (".gz", ".zst", ".zstd", ".bz2", ".lz4")
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


def file_format(path: str, declared: str) -> str | None:
    if declared != "auto":
        return declared
    base = path
    for ext in COMPRESSION:
        base = base.removesuffix(ext)
    return EXTENSIONS.get(os.path.splitext(base)[1].lower())


def resolve_sources(sources: list[SourceConfig]) -> list[list[dict[str, Any]]]:
    """Per source, its files as {path, relpath, format}; raises LmforgeError naming a bad path."""
    out = []
    for i, src in enumerate(sources):
        where = f"sources[{i}] ({src.path})"
        if src.is_builtin:
            if src.path != "builtin:python-docs":
                raise LmforgeError(
                    f"{where}: unknown built-in corpus; the one built in is builtin:python-docs"
                )
            out.append(
                [
                    {"path": "builtin:python-docs", "relpath": r, "format": "builtin"}
                    for r in corpus.python_docs_files()
                ]
            )
            continue
        if src.path.startswith("hf:"):
            out.append(_hub_dataset_files(src, where))
            continue
        try:
            files = _list_source(src.path)
        except (OSError, ValueError) as e:
            raise LmforgeError(f"{where}: cannot read: {e}") from None
        items = []
        for path, rel in files:
            fmt = file_format(path, src.format)
            if fmt is not None:
                items.append({"path": path, "relpath": rel, "format": fmt})
        if not items:
            raise LmforgeError(
                f"{where}: no readable input files (.txt, .jsonl, .json, .parquet, .csv, .arrow, optionally .gz/.zst); check the path"
            )
        for item in items:
            _check_readable(item["path"], where)
        if any(item["format"] in ("html", "warc") for item in items):
            _check_web_extra(where)
        out.append(items)
    return out


def _hub_dataset_files(src: SourceConfig, where: str) -> list[dict[str, Any]]:
    """`hf:NAME`: load the dataset into the Hugging Face cache (on this, the driver's, machine),
    then read its cache files like any .arrow source. On a multi-node cluster the cache must be
    on storage every node sees (HF_HOME on a shared volume), or `save_to_disk` it to a bucket."""
    try:
        import datasets
    except ImportError:
        raise LmforgeError(
            f"{where}: Hugging Face hub datasets need the `datasets` package: pip install 'lmforge[hf]'"
        ) from None
    name = src.path.removeprefix("hf:")
    try:
        ds = datasets.load_dataset(name, src.hf_config, split=src.hf_split)
    except Exception as e:  # the hub, the network, a bad name or split: all one line to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmforgeError(
            f"{where}: cannot load dataset {name!r} (config {src.hf_config}, split {src.hf_split!r}): {first}"
        ) from None
    files = [c["filename"] for c in getattr(ds, "cache_files", [])]
    if not files:
        raise LmforgeError(
            f"{where}: dataset {name!r} has no cache files to read (an in-memory dataset)"
        )
    return [
        {"path": f, "relpath": f"{name}/{src.hf_split}/{posixpath.basename(f)}", "format": "arrow"}
        for f in files
    ]


def _list_source(path: str) -> list[tuple[str, str]]:
    import pyarrow.fs as pafs

    if any(ch in path for ch in "*?["):
        base = path
        while any(ch in base for ch in "*?["):
            base = base.rsplit("/", 1)[0] if "/" in base else "."
        pattern = path
        files = storage.list_files(base)
        return [
            (f, _rel(f, base))
            for f in files
            if fnmatch.fnmatch(f, pattern)
            or fnmatch.fnmatch(os.path.abspath(f), os.path.abspath(pattern))
        ]
    fs, inner = storage.resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {path}")
    if info.type == pafs.FileType.Directory:
        files = [(f, _rel(f, path)) for f in storage.list_files(path) if not _hidden(f)]
        if any(f.endswith(".arrow") for f, _ in files):
            # a Hugging Face `save_to_disk` folder: its JSON files describe the data, not hold it
            files = [(f, r) for f, r in files if posixpath.basename(r) not in _HF_METADATA]
        return files
    return [(path, posixpath.basename(inner))]


def _rel(path: str, base: str) -> str:
    return posixpath.relpath(path, base) if storage.is_uri(base) else os.path.relpath(path, base)


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.replace("\\", "/").split("/")[-1:])


def _check_web_extra(where: str) -> None:
    try:
        import trafilatura  # noqa: F401
        import warcio  # noqa: F401
    except ImportError as e:
        raise LmforgeError(
            f"{where}: reading .html/.warc files needs the web extra "
            f"(pip install 'lmforge[web]': trafilatura, warcio): {e}"
        ) from None


def _check_readable(path: str, where: str) -> None:
    if storage.is_local(path) and not os.access(storage.local_path(path), os.R_OK):
        raise LmforgeError(f"{where}: file is not readable (permissions): {path}")


# ---------------------------------------------------------------- reading one file


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
        with _open(item["path"]) as f:
            raw = f.read(limit + 1)
        if len(raw) > limit:
            yield 1, _decode(raw[:SNIPPET_CHARS])[0], "record_too_large"
        else:
            yield 1, *_decode(raw)
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
    with _open(item["path"]) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        yield 1, _decode(raw[:SNIPPET_CHARS])[0], "record_too_large"
    else:
        yield 1, *_main_text(raw)


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
