"""The `data` stage: read -> steps -> dedup -> tokenizer -> tokenize + pack (the Ray Data
operators are in pipeline.py; this module runs them in order and writes the outputs).

Output (the data contract): train/*.parquet and val/*.parquet (column `tokens`, fixed-size
lists of seq_len + 1 uint16/int32), tokenizer.json, rejects/ (JSON lines: every dropped or
unreadable record with its step, reason, source, path and line), manifest.json, funnel.png
(documents left after each step); the stage
runner writes _SUCCESS last. Every input document is accounted for:
documents_in = documents_out + sum(rejected) + duplicates_exact + duplicates_near.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

from lmforge import ConfigError, StageFailed, storage
from lmforge.data import sources, tokenizer
from lmforge.data.config import DataConfig
from lmforge.data.manifest import build_manifest, dataset_stats, print_summary
from lmforge.data.pipeline import (
    bands_rows,
    dedup_documents,
    partitions,
    read_and_clean,
    select_rows,
    tokenize_and_pack,
    tokenizer_and_sample,
    write_rejects,
)
from lmforge.data.steps import build_steps
from lmforge.plots import write_data_funnel
from lmforge.stage import Stage, StageContext


def run(cfg: DataConfig, ctx: StageContext) -> dict[str, Any]:
    # validate before spending: every source, step resource and the given tokenizer
    files = sources.resolve_sources(cfg.sources)
    try:
        build_steps(cfg.steps)
    except (OSError, ValueError) as e:
        raise ConfigError(f"steps: {type(e).__name__}: {e}") from None
    given_tok = (
        tokenizer.loadtokenizer_and_sample(cfg.tokenizer.path) if cfg.tokenizer.path else None
    )
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True  # limits: first records
    try:
        return _run(cfg, ctx, files, given_tok)
    finally:
        options.preserve_order = saved


def _run(cfg: DataConfig, ctx: StageContext, files, given_tok) -> dict[str, Any]:
    import ray

    start = time.perf_counter()
    workers = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    for sub in ("train", "val", "rejects"):
        storage.remove(storage.join(ctx.output, sub))

    phases: dict[str, float] = {}
    clock = _Clock(phases)
    with clock("read+steps"):
        docs = read_and_clean(cfg, files, workers)
        read = dataset_stats(docs)
    parts = max(1, partitions(read["kept_bytes"], workers))
    reject_parts = [select_rows(docs, rejected=True)]
    if not read["kept"]:  # nothing to dedup, train a tokenizer on, or pack
        write_rejects(ctx.output, reject_parts)
        raise ConfigError(nothing_left(read, storage.join(ctx.output, "rejects")))
    kept = select_rows(docs, rejected=False)
    duplicates_exact = duplicates_near = 0
    if cfg.dedup.exact or cfg.dedup.near:
        with clock("dedup"):
            kept, dups, duplicates_exact, duplicates_near = dedup_documents(kept, parts, cfg)
        reject_parts.append(dups)
    with clock("rejects"):
        kept = kept.materialize()
        final = dataset_stats(kept)
        write_rejects(ctx.output, reject_parts)

    with clock("tokenizer"):
        tok, sample = tokenizer_and_sample(cfg, kept, final["kept_bytes"], given_tok)
        tok_json = tok.to_str()
        storage.write_text(storage.join(ctx.output, "tokenizer.json"), tok_json)
    dtype = tokenizer.token_dtype(tok.get_vocab_size())
    shards = _shard_counts(cfg, tok, sample, final["kept_bytes"], 2 if dtype == "uint16" else 4)
    with clock("tokenize+pack"):
        stats = (
            tokenize_and_pack(cfg, kept, tok, tok_json, shards, dtype, ctx.output, workers)
            if final["kept"]
            else []
        )

    manifest = build_manifest(
        cfg,
        stats,
        start,
        read,
        final["kept"],
        duplicates_exact,
        duplicates_near,
        tok.get_vocab_size(),
        dtype,
        tok_json,
        bands_rows(cfg),
    )
    manifest["phase_seconds"] = {k: round(v, 3) for k, v in phases.items()}
    if revisions := sources.hub_revisions(cfg.sources, files):
        manifest["hf_revisions"] = revisions  # what an unpinned hf: source read
    storage.write_json(storage.join(ctx.output, "manifest.json"), manifest)
    write_data_funnel(ctx.output, manifest)  # funnel.png: documents left after each step
    print_summary(cfg, manifest)
    if not manifest["blocks_train"]:
        raise StageFailed(
            f"no training blocks: {manifest['documents_out']} documents survived, "
            f"{manifest['tokens_dropped_remainder']} tokens (less than seq_len + 1 per shard); "
            f"see {storage.join(ctx.output, 'manifest.json')} and rejects/"
        )
    keys = ("documents_in", "documents_out", "tokens_train", "tokens_val", "vocab_size")
    return {k: manifest[k] for k in keys}


def nothing_left(read: dict[str, Any], rejects: str) -> str:
    """The one line for a corpus that is empty or wholly filtered out, with the reasons."""
    if not read["docs"]:
        return "no documents read from the sources: check data.sources (paths, formats, limits)"
    reasons: dict[str, int] = {}
    for by_reason in read["rejected"].values():
        for reason, n in by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + n
    listed = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1]))
    return (
        f"no documents left after the filters: {read['docs']} read, "
        f"{sum(reasons.values())} rejected ({listed}); see {rejects}"
    )


class _Clock:
    """`with clock("phase"):` adds the phase's wall time to a dict (manifest phase_seconds)."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases = phases

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


def _shard_counts(
    cfg: DataConfig, tok, sample: list[str], total_bytes: int, token_bytes: int
) -> dict[str, int]:
    """Shards per split so that each holds about shard_size_mb of tokens (estimated from a
    slice of the sample: the count is fixed before packing, so file names are too)."""
    probe = sample[:2000]
    probe_bytes = sum(len(t.encode()) for t in probe)
    probe_tokens = (
        sum(len(e.ids) + 1 for e in tok.encode_batch(probe, add_special_tokens=False))
        if probe_bytes
        else 1
    )
    est_tokens = total_bytes * probe_tokens / max(1, probe_bytes)
    per_shard = cfg.shard_size_mb * 2**20 / token_bytes
    return {
        "train": max(1, math.ceil(est_tokens * (1 - cfg.val_fraction) / per_shard)),
        "val": max(1, math.ceil(est_tokens * cfg.val_fraction / per_shard)),
    }


def validate(cfg: DataConfig) -> None:
    """Before Ray starts (`Stage.validate`): the sources exist, the steps' resources load,
    the given tokenizer loads."""
    sources.resolve_sources(cfg.sources)
    try:
        build_steps(cfg.steps)
    except (OSError, ValueError) as e:
        raise ConfigError(f"steps: {type(e).__name__}: {e}") from None
    if cfg.tokenizer.path:
        tokenizer.loadtokenizer_and_sample(cfg.tokenizer.path)


def scaffold(preset: str) -> dict[str, Any]:
    vocab = {"tiny": 4096, "small": 16384, "1b": 32768, "8b": 65535}.get(preset, 8192)
    seq = {"tiny": 256, "small": 1024, "1b": 2048, "8b": 4096}.get(preset, 1024)
    return {"tokenizer": {"vocab_size": vocab}, "seq_len": seq}


STAGE = Stage(
    name="data",
    config_cls=DataConfig,
    run=run,
    help="Prepare training data on Ray Data: read sources, clean, filter, redact PII, dedup "
    "(exact + MinHash LSH), train a BPE tokenizer, tokenize and pack into Parquet shards.",
    scaffold=scaffold,
    validate=validate,
)
