"""The data stage's Ray Data operators: read and clean, dedup, the tokenizer sample, tokenize
and pack, rejects. `data/stage.py` calls them in that order; each takes and returns Ray Datasets
whose rows carry `reject` ("" for a kept document) and `step` (the step that dropped it)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmforge import storage
from lmforge.data import dedup, pack, readers, tokenizer
from lmforge.data.config import DataConfig
from lmforge.data.manifest import COUNTS_TYPE
from lmforge.data.steps import build_steps, step_labels

REJECT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("path", pa.string()),
        ("line", pa.int64()),
        ("id", pa.int64()),
        ("step", pa.string()),
        ("reason", pa.string()),
        ("duplicate_of", pa.int64()),
        ("snippet", pa.large_string()),
    ]
)


class StepRunner:
    """Actor: applies the steps to each document of a batch, keeps every step's counts, then
    adds what dedup needs."""

    def __init__(self, cfg: DataConfig, bands: int, rows: int) -> None:
        self.steps = list(zip(step_labels(cfg.steps), build_steps(cfg.steps), strict=True))
        d = cfg.dedup
        self.hasher = dedup.MinHasher(d.num_perm, d.ngram, d.ngram_unit, d.seed) if d.near else None
        self.bands, self.rows = bands, rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        reject = batch.column("reject").to_pylist()
        step = batch.column("step").to_pylist()
        counts: list[list[dict[str, Any]]] = [[] for _ in texts]
        hashes = np.zeros(len(texts), dtype=np.int64)
        sigs: list[Any] = []
        bands: list[Any] = []
        for i, text in enumerate(texts):
            if not reject[i]:
                for label, s in self.steps:
                    out = s.process(text)
                    counts[i] += [
                        {"step": label, "counter": k, "n": v} for k, v in (out.counts or {}).items()
                    ]
                    if out.reason:
                        reject[i], step[i], text = out.reason, label, text[: readers.SNIPPET_CHARS]
                        break
                    text = out.text
                texts[i] = text
            if reject[i] or self.hasher is None:
                sigs.append([])
                bands.append([])
            else:
                sig = self.hasher.signature(text)
                sigs.append(sig)
                bands.append(dedup.band_keys(sig, self.bands, self.rows))
            if not reject[i]:
                hashes[i] = dedup.exact_hash(text)
        cols = {
            **{n: batch.column(n) for n in ("id", "source", "path", "line", "copies")},
            "text": pa.array(texts, pa.large_string()),
            "reject": pa.array(reject, pa.string()),
            "step": pa.array(step, pa.string()),
            "hash": hashes,
            "n_bytes": np.array([len(t.encode()) for t in texts], dtype=np.int64),
            "sig": pa.array(sigs, pa.list_(pa.uint32())),
            "bands": pa.array(bands, pa.list_(pa.int64())),
            # whatever each step counted, under its label: the manifest adds these up
            "counts": pa.array(counts, COUNTS_TYPE),
        }
        return pa.table(cols)


def select_rows(ds, rejected: bool):
    def keep(t: pa.Table) -> pa.Table:
        mask = pc.equal(t["reject"], "")
        return t.filter(pc.invert(mask) if rejected else mask)

    return ds.map_batches(keep, batch_format="pyarrow", batch_size=None)


def _as_rejects(t: pa.Table) -> pa.Table:
    dup = t["duplicate_of"] if "duplicate_of" in t.column_names else pa.nulls(len(t), pa.int64())
    snippet = pc.utf8_slice_codeunits(t["text"].cast(pa.large_string()), 0, readers.SNIPPET_CHARS)
    cols = [t["source"], t["path"], t["line"], t["id"], t["step"], t["reject"], dup, snippet]
    return pa.Table.from_arrays(cols, schema=REJECT_SCHEMA)


def _mark_duplicates(
    t: pa.Table, dropped: np.ndarray, roots: np.ndarray, exact: np.ndarray
) -> pa.Table:
    """Mark the rows whose id is in `dropped` (sorted) as duplicates of their root."""
    ids = t["id"].to_numpy()
    pos = np.searchsorted(dropped, ids).clip(0, len(dropped) - 1)
    hit = dropped[pos] == ids
    is_exact = hit & exact[pos]
    col = t.schema.get_field_index
    reason = np.where(is_exact, "duplicate_exact", np.where(hit, "duplicate_near", ""))
    step = np.where(is_exact, "dedup_exact", np.where(hit, "dedup_near", ""))
    t = t.set_column(col("reject"), "reject", pa.array(reason, pa.string()))
    t = t.set_column(col("step"), "step", pa.array(step, pa.string()))
    return t.append_column("duplicate_of", pa.array(np.where(hit, roots[pos], 0), pa.int64()))


def partitions(total_bytes: int, workers: int) -> int:
    # enough partitions to keep every worker busy, and none much above 256 MB
    return max(2 * workers, math.ceil(total_bytes / 2**28))


def bands_rows(cfg: DataConfig) -> tuple[int, int]:
    d = cfg.dedup
    return (d.bands, d.rows) if d.bands and d.rows else dedup.optimal_bands(d.threshold, d.num_perm)


def read_and_clean(cfg: DataConfig, files: list[list[dict[str, Any]]], workers: int):
    """Every source read file by file, the steps applied, hashes and band keys added."""
    import ray.data
    from ray.data import ActorPoolStrategy

    parts = []
    limit = int(cfg.max_record_mb * 2**20)
    for src, items in zip(cfg.sources, files, strict=True):
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * workers))
        ds = ds.map_batches(
            _read_batch,
            fn_kwargs={"src": src, "limit": limit, "batch_size": cfg.batch_size},
            batch_size=1,
            batch_format="pyarrow",
        )
        parts.append(ds.limit(src.limit) if src.limit else ds)
    docs = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    bands, rows = bands_rows(cfg)
    return docs.map_batches(
        StepRunner,
        fn_constructor_kwargs={"cfg": cfg, "bands": bands, "rows": rows},
        compute=ActorPoolStrategy(min_size=1, max_size=workers),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
    ).materialize()


def dedup_documents(kept, parts: int, cfg: DataConfig):
    """Exact and near duplicates in one shuffle by bucket (see dedup.py); returns the kept
    documents, the duplicates (as rejects) and the two counts."""
    kept = kept.materialize()
    edges = (
        kept.select_columns(["id", "hash", "sig", "bands"])
        .map_batches(
            dedup.explode_buckets,
            fn_kwargs={"exact": cfg.dedup.exact, "near": cfg.dedup.near},
            batch_format="pyarrow",
        )
        .repartition(parts, keys=["bucket"], sort=True)
        .map_batches(
            dedup.bucket_edges,
            fn_kwargs={"threshold": cfg.dedup.threshold},
            batch_size=None,
            batch_format="pyarrow",
        )
    )
    hashes: dict[int, int] = {}

    def edge_batches():
        for b in edges.iter_batches(batch_format="numpy"):
            hashes.update(zip(b["src"].tolist(), b["src_hash"].tolist(), strict=True))
            hashes.update(zip(b["dst"].tolist(), b["dst_hash"].tolist(), strict=True))
            yield b["src"], b["dst"]

    roots = dedup.components(edge_batches())
    if not roots:
        return kept, select_rows(kept, rejected=True), 0, 0
    dropped = np.array(sorted(roots), dtype=np.int64)
    root_of = np.array([roots[i] for i in dropped.tolist()], dtype=np.int64)
    # as if exact dedup ran first: among documents with the same text, all but the smallest id
    # are exact duplicates; the rest of each component (all but its smallest id) are near ones
    first_of_hash: dict[int, int] = {}
    for i in sorted(set(roots) | set(roots.values())):
        first_of_hash.setdefault(hashes[i], i)
    exact = np.array(
        [bool(cfg.dedup.exact) and first_of_hash[hashes[i]] != i for i in dropped.tolist()],
        dtype=bool,
    )
    marked = kept.map_batches(
        _mark_duplicates,
        fn_kwargs={"dropped": dropped, "roots": root_of, "exact": exact},
        batch_format="pyarrow",
    ).materialize()
    n_exact = int(exact.sum())
    return (
        select_rows(marked, rejected=False),
        select_rows(marked, rejected=True),
        n_exact,
        len(dropped) - n_exact,
    )


def tokenize_and_pack(cfg, kept, tok, tok_json, shards, dtype, out, workers) -> list[dict]:
    from ray.data import ActorPoolStrategy

    tokenized = kept.select_columns(["id", "text", "copies"]).map_batches(
        pack.Tokenize,
        fn_constructor_kwargs={
            "tokenizer_json": tok_json,
            "val_fraction": cfg.val_fraction,
            "shards": shards,
        },
        compute=ActorPoolStrategy(min_size=1, max_size=workers),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
    )
    return (
        tokenized.groupby("key", num_partitions=shards["train"] + shards["val"])
        .map_groups(
            pack.pack_shard,
            fn_kwargs={
                "out": out,
                "seq_len": cfg.seq_len,
                "eos": tok.token_to_id(tokenizer.EOS),
                "dtype": dtype,
            },
            batch_format="pyarrow",
        )
        .take_all()
    )


def _read_batch(batch: pa.Table, src, limit: int, batch_size: int):
    for item in batch.to_pylist():
        yield from readers.read_file(src, item, limit, batch_size)


def write_rejects(out: str, parts: list) -> None:
    rejects = storage.join(out, "rejects")
    storage.makedirs(rejects)
    parts = [p.map_batches(_as_rejects, batch_format="pyarrow", batch_size=None) for p in parts]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if ds.count():
        ds.write_json(rejects, force_ascii=False)


def tokenizer_and_sample(cfg: DataConfig, kept, total_bytes: int, given):
    """The tokenizer, and a small sample of documents (sorted by id) for estimating sizes."""
    rate = min(1.0, cfg.tokenizer.sample_mb * 2**20 / max(1, total_bytes))
    cut = int(rate * 2**20)

    def sample_rows(t: pa.Table) -> pa.Table:
        return t.filter(pc.less(pc.bit_wise_and(pc.shift_right(t["id"], 20), 2**20 - 1), cut))

    rows = (
        kept.select_columns(["id", "text"])
        .map_batches(sample_rows, batch_format="pyarrow", batch_size=None)
        .take_all()
        if total_bytes
        else []
    )
    texts = [r["text"] for r in sorted(rows, key=lambda r: r["id"])]
    if given is not None:
        return given, texts
    if not texts:
        texts = [""]
    return tokenizer.train_bpe(
        texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, length=len(texts)
    ), texts
