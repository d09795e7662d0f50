"""Tokenize and pack: documents -> EOS-joined token stream -> fixed blocks of seq_len + 1.

Tokenizing runs in an actor pool (`Tokenize` holds the tokenizer). Documents are then grouped
by output shard (a hash of their id, with train/val decided by another part of the hash), and
each shard is packed by one task: its documents sorted by id, each followed by EOS, cut into
blocks of seq_len + 1 tokens. The tail that does not fill a block is dropped and counted. The
shard file is written atomically under a name fixed by its split and index, so the output is
byte-identical whatever the cluster, order of execution or a kill-and-rerun.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmforge import storage

SPLIT_BUCKETS = 1_000_000


def split_of(ids: np.ndarray, val_fraction: float) -> np.ndarray:
    """True for validation documents: the low digits of the id hash below val_fraction."""
    return (ids % SPLIT_BUCKETS) < int(round(val_fraction * SPLIT_BUCKETS))


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    return (ids // SPLIT_BUCKETS) % max(1, num_shards)


class Tokenize:
    """Actor: adds `tokens` (list<int32>, the document's ids), `key` (split and shard) and
    `n_bytes`; the Python work per document is only the encode call, the rest is Arrow."""

    def __init__(self, tokenizer_json: str, val_fraction: float, shards: dict[str, int]) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.val_fraction, self.shards = val_fraction, shards

    def __call__(self, batch: pa.Table) -> pa.Table:
        encs = self.tok.encode_batch(batch.column("text").to_pylist(), add_special_tokens=False)
        ids = batch.column("id").to_numpy()
        val = split_of(ids, self.val_fraction)
        shard = np.where(
            val, shard_of(ids, self.shards["val"]), shard_of(ids, self.shards["train"])
        )
        return pa.table(
            {
                "id": ids,
                "key": (val.astype(np.int64) << 32) | shard,
                "copies": batch.column("copies"),
                "tokens": pa.array([e.ids for e in encs], pa.list_(pa.int32())),
                "n_bytes": pc.binary_length(batch.column("text").cast(pa.large_binary())),
            }
        )


def pack_shard(group: pa.Table, out: str, seq_len: int, eos: int, dtype: str) -> pa.Table:
    """Pack one shard's documents and write its Parquet file; returns one row of counts."""
    group = group.sort_by("id")
    key = int(group.column("key")[0].as_py())
    split, shard = ("val" if key >> 32 else "train"), key & 0xFFFFFFFF
    docs = group.column("tokens").combine_chunks()
    n_bytes = group.column("n_bytes").to_numpy().astype(np.int64)
    copies = group.column("copies").to_numpy()
    if (copies != 1).any():  # a source weight packs a document several times, one after another
        take = np.repeat(np.arange(len(docs)), copies)
        docs, n_bytes = docs.take(pa.array(take)), n_bytes[take]
    lengths = np.diff(docs.offsets.to_numpy()).astype(np.int64) + 1  # + EOS
    ends = np.cumsum(lengths)
    stream = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    is_eos = np.zeros(len(stream), dtype=bool)
    is_eos[ends - 1] = True
    stream[~is_eos] = docs.flatten().to_numpy()
    stream[is_eos] = eos
    block = seq_len + 1
    blocks = len(stream) // block
    kept = blocks * block
    # bytes of the text behind the kept tokens: whole documents, plus the kept share of the one cut
    starts = ends - lengths
    whole = ends <= kept
    cut = (starts < kept) & ~whole
    kept_bytes = int(
        n_bytes[whole].sum() + (n_bytes[cut] * (kept - starts[cut]) / lengths[cut]).sum()
    )
    if blocks:
        arr = pa.array(stream[:kept].astype(dtype))
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(arr, block)})
        path = storage.join(out, split, f"part-{shard:05d}.parquet")
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=max(1, min(blocks, 8192)))
        storage.write_bytes(path, buf.getvalue())
    return pa.table(
        {
            "split": [split],
            "shard": [shard],
            "file": [f"{split}/part-{shard:05d}.parquet" if blocks else ""],
            "docs": [len(group)],
            "blocks": [blocks],
            "tokens": [kept],
            "remainder": [len(stream) - kept],
            "bytes": [kept_bytes],
        }
    )
