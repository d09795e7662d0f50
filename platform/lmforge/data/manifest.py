"""What a data run reports: counts per block added up on the driver, manifest.json, the summary.

Counters are computed where the data is (one small row per block) and added up here, so the
driver never sees documents, only a few numbers per block.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lmforge.config import config_hash
from lmforge.data import tokenizer
from lmforge.data.config import DataConfig
from lmforge.data.steps import step_labels

PII_KINDS = ("email", "ipv4", "ipv6", "phone")

# Per document: what each step counted (`Outcome.counts`), e.g. [{"step": "pii", "counter":
# "pii_email", "n": 1}]. A list of structs rather than a column per counter, so a step that
# counts something new needs no new column, schema or manifest field.
COUNTS_TYPE = pa.list_(
    pa.struct([("step", pa.string()), ("counter", pa.string()), ("n", pa.int64())])
)


def _step_counts(column: pa.ChunkedArray) -> list[list[Any]]:
    """[[step, counter, total], ...] of a block's `counts` column."""
    entries = pc.list_flatten(column)
    if not len(entries):
        return []
    sums = (
        pa.table({k: pc.struct_field(entries, k) for k in ("step", "counter", "n")})
        .group_by(["step", "counter"])
        .aggregate([("n", "sum")])
    )
    rows = zip(
        sums["step"].to_pylist(),
        sums["counter"].to_pylist(),
        sums["n_sum"].to_pylist(),
        strict=True,
    )
    return sorted([step, counter, n] for step, counter, n in rows)


def block_stats(t: pa.Table) -> pa.Table:
    """One row of counts per block; the driver adds the rows up (an aggregation without a shuffle)."""
    rejected = t.filter(pc.not_equal(t["reject"], ""))
    pairs = Counter(zip(rejected["step"].to_pylist(), rejected["reject"].to_pylist(), strict=True))
    stats = {
        "docs": len(t),
        "kept": len(t) - len(rejected),
        "kept_bytes": int(pc.sum(t.filter(pc.equal(t["reject"], ""))["n_bytes"]).as_py() or 0),
        "rejected": [[a, b, n] for (a, b), n in sorted(pairs.items())],
        "counts": _step_counts(t["counts"]),
    }
    return pa.table({"stats": [json.dumps(stats)]})


def dataset_stats(ds) -> dict[str, Any]:
    blocks = ds.map_batches(block_stats, batch_format="pyarrow", batch_size=None).take_all()
    return add_up([json.loads(row["stats"]) for row in blocks])


def add_up(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows of `block_stats` added up: numbers summed, `rejected` as step -> reason ->
    count, `counts` as step -> counter -> count."""
    total: dict[str, Any] = defaultdict(int)
    by_step: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for part in blocks:
        for step, reason, n in part.pop("rejected"):
            by_step[step][reason] += n
        for step, counter, n in part.pop("counts"):
            counts[step][counter] += n
        for k, v in part.items():
            total[k] += v
    total["rejected"] = {k: dict(v) for k, v in by_step.items()}
    total["counts"] = {k: dict(v) for k, v in counts.items()}
    return total


def build_manifest(
    cfg,
    stats,
    start,
    read,
    documents_out,
    duplicates_exact,
    duplicates_near,
    vocab_size,
    dtype,
    tok_json,
    bands_rows,
) -> dict[str, Any]:
    def total(split: str, key: str) -> int:
        return int(sum(s[key] for s in stats if s["split"] == split))

    documents_in = read["docs"]
    rejected_by_step = read["rejected"]
    counts = read["counts"]
    pii = dict.fromkeys(PII_KINDS, 0)
    for by_counter in counts.values():
        for counter, n in by_counter.items():
            if counter.startswith("pii_"):
                kind = counter.removeprefix("pii_")
                pii[kind] = pii.get(kind, 0) + n
    rejected: dict[str, int] = defaultdict(int)
    for reasons in rejected_by_step.values():
        for reason, n in reasons.items():
            rejected[reason] += n
    steps, remaining = [], documents_in
    labels = ["read", *step_labels(cfg.steps)]
    labels += [
        x for x, on in (("dedup_exact", cfg.dedup.exact), ("dedup_near", cfg.dedup.near)) if on
    ]
    dups = {
        "dedup_exact": {"duplicate_exact": duplicates_exact},
        "dedup_near": {"duplicate_near": duplicates_near},
    }
    for label in labels:
        dropped = rejected_by_step.get(label) or dups.get(label, {})
        n = sum(dropped.values())
        steps.append(
            {
                "step": label,
                "docs_in": remaining,
                "docs_out": remaining - n,
                "dropped": dict(sorted(dropped.items())),
                "counts": dict(sorted(counts.get(label, {}).items())),
            }
        )
        remaining -= n
    seconds = time.perf_counter() - start
    tokens = total("train", "tokens") + total("val", "tokens")
    return {
        "documents_in": documents_in,
        "documents_out": documents_out,
        "rejected": dict(sorted(rejected.items())),
        "duplicates_exact": duplicates_exact,
        "duplicates_near": duplicates_near,
        "pii_redactions": sum(pii.values()),
        "pii_redactions_by_kind": pii,
        "tokens_train": total("train", "tokens"),
        "tokens_val": total("val", "tokens"),
        "blocks_train": total("train", "blocks"),
        "blocks_val": total("val", "blocks"),
        "bytes_train": total("train", "bytes"),
        "bytes_val": total("val", "bytes"),
        "tokens_dropped_remainder": total("train", "remainder") + total("val", "remainder"),
        "seq_len": cfg.seq_len,
        "vocab_size": vocab_size,
        "token_dtype": dtype,
        "special_tokens": tokenizer.special_token_ids(),
        "shards": {
            split: sorted(s["file"] for s in stats if s["split"] == split and s["file"])
            for split in ("train", "val")
        },
        "tokenizer_sha256": tokenizer.sha256_text(tok_json),
        "config_sha256": config_hash(cfg, length=64),
        "dedup_bands": bands_rows[0],
        "dedup_rows": bands_rows[1],
        "steps": steps,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0,
        "documents_per_second": round(documents_in / seconds, 1) if seconds else 0.0,
    }


def print_summary(cfg: DataConfig, m: dict[str, Any]) -> None:
    buf = io.StringIO()
    width = max(len(s["step"]) for s in m["steps"])
    buf.write(f"[data] {'step':<{width}}  {'docs in':>9}  {'docs out':>9}  dropped\n")
    for s in m["steps"]:
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items() if v) or "-"
        buf.write(
            f"[data] {s['step']:<{width}}  {s['docs_in']:>9}  {s['docs_out']:>9}  {dropped}\n"
        )
    buf.write(
        f"[data] {m['documents_out']} documents -> {m['tokens_train']:,} train + {m['tokens_val']:,} val tokens "
        f"({m['blocks_train']} + {m['blocks_val']} blocks of {cfg.seq_len + 1}), vocab {m['vocab_size']}, "
        f"{m['pii_redactions']} PII redactions; {m['seconds']:.1f}s, {m['documents_per_second']:,.0f} docs/s, "
        f"{m['tokens_per_second']:,.0f} tokens/s\n"
    )
    if not m["blocks_val"] and cfg.val_fraction > 0:
        buf.write("[data] warning: no validation blocks; raise val_fraction or add data\n")
    print(buf.getvalue(), end="", flush=True)
