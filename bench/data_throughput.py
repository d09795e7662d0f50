"""Data stage throughput on the built-in corpus (builtin:python-docs); no download.

    .venv/bin/python bench/data_throughput.py [--scale 8] [--workers N]

Measures, in one Ray session:
- end to end: the whole `data` stage (read, steps, dedup, tokenizer training, pack) on the
  corpus: documents/s and tokens/s from its manifest;
- tokenize + pack: the stage's actor-pool tokenize and per-shard pack over the corpus repeated
  `--scale` times (distinct ids), as tokens/s and as a ratio to one process calling
  `tokenizers`' encode_batch over the same documents (the ceiling: no Ray, no packing);
- MinHash dedup: text hashes + signatures + the bucket shuffle + candidate verification,
  documents/s, and the same signatures computed in one process.
Prints a table and writes bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform")
)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from lmforge import storage  # noqa: E402
from lmforge.builtin import corpus as builtin  # noqa: E402
from lmforge.data import dedup, pack  # noqa: E402


def corpus(scale: int) -> pa.Table:
    texts = [t for f in builtin.python_docs_files() for _, t in builtin.python_docs_records(f)]
    n = len(texts)
    return pa.table(
        {
            "id": np.arange(n * scale, dtype=np.int64) * 1_000_003,
            "text": pa.array(texts * scale, pa.large_string()),
            "copies": np.ones(n * scale, dtype=np.int32),
        }
    )


def end_to_end(runs: str) -> dict:
    from lmforge.data.config import DataConfig
    from lmforge.stage import get_stage, run_stage

    cfg = DataConfig.model_validate(
        {
            "name": "bench",
            "runs_dir": runs,
            "steps": [
                {"step": "normalize"},
                {"step": "length", "min_chars": 100, "min_words": 15},
                {"step": "quality", "max_symbol_word_ratio": 0.5, "min_alpha_word_fraction": 0.5},
                {"step": "pii"},
            ],
            "tokenizer": {"vocab_size": 8192},
            "seq_len": 512,
            "val_fraction": 0.02,
        }
    )
    result = run_stage(get_stage("data"), cfg, quiet=True, force=True)
    m = storage.read_json(os.path.join(result.output, "manifest.json"))
    return {
        "documents_in": m["documents_in"],
        "tokens": m["tokens_train"] + m["tokens_val"],
        "seconds": m["seconds"],
        "docs_per_s": m["documents_per_second"],
        "tokens_per_s": m["tokens_per_second"],
        "phase_seconds": m["phase_seconds"],
        "tokenizer_json": storage.read_text(os.path.join(result.output, "tokenizer.json")),
    }


def tokenize_pack(table: pa.Table, tok_json: str, workers: int, out: str) -> dict:
    import ray.data
    from ray.data import ActorPoolStrategy
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    texts = table.column("text").to_pylist()
    start = time.perf_counter()
    encs = tok.encode_batch(texts, add_special_tokens=False)
    baseline_s = time.perf_counter() - start
    tokens = sum(len(e.ids) + 1 for e in encs)

    ds = ray.data.from_arrow(table).repartition(4 * workers).materialize()
    shards = {"train": workers, "val": 1}
    runs = []
    for _ in range(2):  # cold (actors and shuffle workers start), then warm
        start = time.perf_counter()
        stats = (
            ds.map_batches(
                pack.Tokenize,
                fn_constructor_kwargs={
                    "tokenizer_json": tok_json,
                    "val_fraction": 0.01,
                    "shards": shards,
                },
                compute=ActorPoolStrategy(min_size=1, max_size=workers),
                batch_size=512,
                batch_format="pyarrow",
            )
            .groupby("key", num_partitions=workers + 1)
            .map_groups(
                pack.pack_shard,
                fn_kwargs={"out": out, "seq_len": 512, "eos": 2, "dtype": "uint16"},
                batch_format="pyarrow",
            )
            .take_all()
        )
        runs.append(time.perf_counter() - start)
    ray_s, warm_s = runs
    packed = sum(s["tokens"] + s["remainder"] for s in stats)
    assert packed == tokens, (packed, tokens)
    return {
        "documents": len(texts),
        "tokens": tokens,
        "encode_batch_s": baseline_s,
        "encode_batch_tokens_per_s": tokens / baseline_s,
        "ray_s": ray_s,
        "ray_tokens_per_s": tokens / ray_s,
        "ratio": baseline_s / ray_s,
        "warm_ray_s": warm_s,
        "warm_ray_tokens_per_s": tokens / warm_s,
        "warm_ratio": baseline_s / warm_s,
    }


def minhash_dedup(table: pa.Table, workers: int) -> dict:
    import ray.data

    d = {"num_perm": 128, "threshold": 0.8}
    bands, rows = dedup.optimal_bands(d["threshold"], d["num_perm"])

    def signatures(t: pa.Table) -> pa.Table:
        h = dedup.MinHasher(d["num_perm"], 5, "word", 1)
        sigs = [h.signature(x) for x in t.column("text").to_pylist()]
        return pa.table(
            {
                "id": t["id"],
                "hash": [dedup.exact_hash(x) for x in t.column("text").to_pylist()],
                "sig": pa.array(sigs, pa.list_(pa.uint32())),
                "bands": pa.array(
                    [dedup.band_keys(s, bands, rows) for s in sigs], pa.list_(pa.int64())
                ),
            }
        )

    texts = table.column("text").to_pylist()[: max(1, len(table) // 4)]
    h = dedup.MinHasher(d["num_perm"], 5, "word", 1)
    start = time.perf_counter()
    for x in texts:
        dedup.band_keys(h.signature(x), bands, rows)
    single = len(texts) / (time.perf_counter() - start)

    ds = ray.data.from_arrow(table.select(["id", "text"])).repartition(4 * workers).materialize()
    start = time.perf_counter()
    edges = (
        ds.map_batches(signatures, batch_format="pyarrow", batch_size=256)
        .map_batches(
            dedup.explode_buckets,
            fn_kwargs={"exact": True, "near": True},
            batch_format="pyarrow",
        )
        .repartition(2 * workers, keys=["bucket"], sort=True)
        .map_batches(
            dedup.bucket_edges,
            fn_kwargs={"threshold": d["threshold"]},
            batch_size=None,
            batch_format="pyarrow",
        )
    )
    pairs = sum(len(b["src"]) for b in edges.iter_batches(batch_format="numpy"))
    seconds = time.perf_counter() - start
    return {
        "documents": len(table),
        "seconds": seconds,
        "docs_per_s": len(table) / seconds,
        "single_process_signature_docs_per_s": single,
        "candidate_edges": pairs,
        "bands": bands,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=8,
        help="repeat the corpus this many times for the tokenize+pack and dedup measurements",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="actor pool size (default: the CPUs)"
    )
    parser.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", "data_throughput.json"
        ),
    )
    args = parser.parse_args()

    from lmforge.cluster.local import connect

    connect(None)
    import ray

    workers = args.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    with tempfile.TemporaryDirectory() as tmp:
        e2e = end_to_end(os.path.join(tmp, "runs"))
        table = corpus(args.scale)
        tp = tokenize_pack(table, e2e.pop("tokenizer_json"), workers, os.path.join(tmp, "pack"))
        mh = minhash_dedup(table, workers)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "ray_cpus": workers,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "scale": args.scale,
        "end_to_end": e2e,
        "tokenize_pack": tp,
        "minhash_dedup": mh,
    }
    rows = [
        (
            "end to end (whole stage)",
            f"{e2e['documents_in']:,} docs",
            f"{e2e['docs_per_s']:,.0f} docs/s",
            f"{e2e['tokens_per_s']:,.0f} tok/s",
            f"{e2e['seconds']:.1f}s",
        ),
        (
            "encode_batch, 1 process",
            f"{tp['documents']:,} docs",
            "",
            f"{tp['encode_batch_tokens_per_s']:,.0f} tok/s",
            f"{tp['encode_batch_s']:.1f}s",
        ),
        (
            "tokenize+pack on Ray",
            f"{tp['documents']:,} docs",
            f"ratio {tp['ratio']:.2f}",
            f"{tp['ray_tokens_per_s']:,.0f} tok/s",
            f"{tp['ray_s']:.1f}s",
        ),
        (
            "  same, second run (warm)",
            "",
            f"ratio {tp['warm_ratio']:.2f}",
            f"{tp['warm_ray_tokens_per_s']:,.0f} tok/s",
            f"{tp['warm_ray_s']:.1f}s",
        ),
        (
            "MinHash dedup on Ray",
            f"{mh['documents']:,} docs",
            f"{mh['docs_per_s']:,.0f} docs/s",
            f"{mh['candidate_edges']:,} edges",
            f"{mh['seconds']:.1f}s",
        ),
        (
            "MinHash sigs, 1 process",
            "",
            f"{mh['single_process_signature_docs_per_s']:,.0f} docs/s",
            "",
            "",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(
        f"\ndata throughput, builtin:python-docs (x{args.scale} for the last rows), {workers} Ray CPUs"
    )
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in e2e["phase_seconds"].items())
    print(f"  end-to-end phases: {phases}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
