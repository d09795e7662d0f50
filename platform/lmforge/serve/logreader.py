"""Reading the request log back: every row of one kind (`requests` or `feedback`) under a log
path, in its schema (columns that older files lack are null), optionally from a time on. The
monitor report and the improvement job read it here; serve/requestlog.py writes it."""

from __future__ import annotations

import datetime as dt
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmforge import LmforgeError, storage
from lmforge.serve.requestlog import SCHEMAS, TIME


def read_log(
    path: str, kind: Literal["requests", "feedback"], since: dt.datetime | None = None
) -> pa.Table:
    """Every row of one kind under a log `path` (local dir or URI), optionally only those at or
    after `since` (a naive datetime is read as UTC), in the kind's schema, sorted by time."""
    if kind not in SCHEMAS:
        raise LmforgeError(f"read_log: kind must be 'requests' or 'feedback', not {kind!r}")
    schema = SCHEMAS[kind]
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    tables = []
    for file in log_files(path, kind, since):
        table = pq.read_table(pa.BufferReader(storage.read_bytes(file)))
        tables.append(conform(table, schema))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if since is not None:
        mask = pc.greater_equal(table["time"], pa.scalar(since, type=TIME))
        table = table.filter(mask)
    return table.sort_by("time") if table.num_rows else table


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`: a column that files written before it existed lack is null."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def log_files(
    path: str, kind: Literal["requests", "feedback"], since: dt.datetime | None = None
) -> list[str]:
    """The Parquet files of one kind under a log `path`, without the date partitions that end
    before `since` (rows in the files kept may still be older: filter on `time`)."""
    files = storage.list_files(storage.join(path, kind), suffix=".parquet")
    if since is None:
        return files
    return [f for f in files if (d := _partition_date(f)) is None or d >= since.date()]


def _partition_date(file: str) -> dt.date | None:
    for part in file.replace("\\", "/").split("/"):
        if part.startswith("date="):
            try:
                return dt.date.fromisoformat(part[len("date=") :])
            except ValueError:
                return None
    return None
