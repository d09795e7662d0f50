"""Supervised chat (SFT) data: conversations -> tokens with a loss mask -> packed Parquet rows.

Input, one JSON object per line of a JSONL file (or `builtin:stdlib-sft`, see builtin_sft.py):

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}  (>= 1 assistant)
    {"prompt": str, "completion": str}        (= a user turn and an assistant turn)

Each conversation becomes token ids and a loss mask as finetune/conversation.py describes
(rendering with the model's chat template, which tokens are targets).

Output (the contract with the trainer), under `out/`: train/part-NNNNN.parquet and
val/part-NNNNN.parquet (val/ only when the split has examples), tokenizer.json, manifest.json
(`kind: sft`; `loss_tokens_val` / `loss_bytes_val`, the val split's target tokens and the UTF-8
bytes they decode to, turn the trainer's val loss into bits per byte), _SUCCESS. Every row
holds seq_len + 1 slots in three fixed-size-list columns:

    tokens     int32  the ids; several examples one after another (packing), then <|pad|>
    loss_mask  int8   1 where tokens[i] is a prediction target, i.e. predicted from tokens[:i];
                      0 on the first token of every example (nothing of its own precedes it),
                      on padding and on what the loss does not cover
    segments   int32  1..k: which example of the row the slot belongs to; 0: padding

The trainer takes inputs tokens[:-1] and targets tokens[1:], where loss_mask[1:] == 1; attention
is document-masked by segments[:-1] (a token sees only earlier tokens of its own segment) and
positions restart at 0 with each segment, so a packed example trains exactly as if alone.

Rows are packed greedily in a fixed order (examples sorted by a stable key: source, file, line),
first-fit over a window of open rows, so the output is byte-identical whatever Ray's block order.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from lmforge import ConfigError, LmforgeError, storage
from lmforge.config import StrictModel
from lmforge.finetune.conversation import LossOn, encode_conversation, loss_bytes, parse_example
from lmforge.finetune.packing import RowPacker
from lmforge.model.special import LMFORGE, SpecialTokens

BUILTIN = "builtin:stdlib-sft"
PAD = "<|pad|>"
TRAIN, VAL, BY_HASH = 0, 1, 2  # an example's split; BY_HASH: decided by val_fraction
MAX_PROBLEMS = 100  # bad lines listed in the manifest (all are counted)


class SftDataConfig(StrictModel):
    """Chat fine-tuning data: sources, validation split, loss masking and packing."""

    sources: list[str] = Field(
        default_factory=lambda: [BUILTIN],
        description="JSONL files or directories of them (paths or URIs), one conversation per "
        "line ({messages: [...]} or {prompt, completion}), or `builtin:stdlib-sft`.",
    )
    val_sources: list[str] = Field(
        default_factory=list,
        description="Validation data, like `sources`. Empty: the held-out split of built-in "
        "sources and a `val_fraction` of each file's examples.",
    )
    val_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Share of the file sources' examples held out for validation (a seeded hash "
        "of file and line); unused when `val_sources` is given.",
    )
    loss_on: LossOn = Field(
        "assistant",
        description="Which tokens are trained on: every assistant turn, only the last one, or "
        "`all` tokens of the conversation.",
    )
    packing: bool = Field(
        True, description="Several examples per row (document-masked); false: one per row."
    )
    seq_len: int | None = Field(
        None, ge=8, description="Row length in tokens. Default: the base model's max_seq_len."
    )
    max_examples: int | None = Field(
        None,
        ge=1,
        description="At most this many examples per split, a seeded sample (for quick runs).",
    )
    seed: int = Field(0, description="Seed of the validation split and the max_examples sample.")
    truncate: Literal["drop", "truncate"] = Field(
        "drop",
        description="An example longer than seq_len + 1 tokens: `drop` it (counted) or keep "
        "its first seq_len + 1 tokens.",
    )


# ---------------------------------------------------------------- reading sources


def source_files(source: str, where: str) -> list[str]:
    """The JSONL files of a source: the file itself, or the .jsonl files under a directory."""
    if storage.is_dir(source):
        files = storage.list_files(source, suffix=".jsonl")
        if not files:
            raise ConfigError(f"{where}: no .jsonl files under {source}")
        return files
    if not storage.exists(source):
        raise ConfigError(
            f"{where}: no such file {source} (give a JSONL file, a directory or {BUILTIN})"
        )
    return [source]


def plan_inputs(cfg: SftDataConfig) -> list[dict[str, Any]]:
    """Every input as {path, index, split}: its position in the example key and its split.
    Checked before any work starts: a missing file or unknown builtin is a ConfigError."""
    inputs: list[dict[str, Any]] = []
    for field, split in (("sources", TRAIN), ("val_sources", VAL)):
        for n, source in enumerate(getattr(cfg, field)):
            where = f"data.{field}[{n}]"
            if source.startswith("builtin:"):
                if source != BUILTIN:
                    raise ConfigError(
                        f"{where}: unknown built-in SFT data {source!r}; built in: {BUILTIN}"
                    )
                builtin_splits = [split] if split == VAL or cfg.val_sources else [TRAIN, VAL]
                inputs += [
                    {"path": f"{BUILTIN}/{'val' if s else 'train'}", "split": s}
                    for s in builtin_splits
                ]
                continue
            file_split = split if split == VAL or cfg.val_sources else BY_HASH
            inputs += [{"path": f, "split": file_split} for f in source_files(source, where)]
    if len(inputs) >= 2**15:
        raise ConfigError(f"data: {len(inputs)} input files; at most {2**15 - 1}")
    return [{**item, "index": i} for i, item in enumerate(inputs)]


def read_input(item: dict[str, Any], batch_lines: int = 4096) -> Iterator[pa.Table]:
    """The lines of one input as tables {key, split, where, line} (key: input index << 32 | line)."""
    path = item["path"]
    if path.startswith(BUILTIN):
        from lmforge.builtin.sft import builtin_sft_examples

        examples = builtin_sft_examples("val" if item["split"] == VAL else "train")
        lines = [json.dumps({"messages": e["messages"]}) for e in examples]
    else:
        try:
            lines = storage.read_text(path).splitlines()
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for start in range(0, len(lines), batch_lines):
        numbers = range(start + 1, min(start + batch_lines, len(lines)) + 1)
        yield pa.table(
            {
                "key": pa.array([(item["index"] << 32) | n for n in numbers], pa.int64()),
                "split": pa.array([item["split"]] * len(numbers), pa.int8()),
                "where": [f"{path}:{n}" for n in numbers],
                "line": lines[start : start + batch_lines],
            }
        )


def _read_inputs_batch(batch: pa.Table) -> Iterator[pa.Table]:
    for item in batch.to_pylist():
        yield from read_input(item)


ENCODED = pa.schema(
    [
        ("key", pa.int64()),
        ("split", pa.int8()),
        ("where", pa.string()),
        ("tokens", pa.list_(pa.int32())),
        ("mask", pa.list_(pa.int8())),
        ("status", pa.string()),  # "" | "bad" | "too_long" | "truncated"
        ("error", pa.string()),
    ]
)


def is_val(where: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{where}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1_000_000 < int(round(fraction * 1_000_000))


class EncodeExamples:
    """Ray Data actor (or a plain callable): JSONL lines -> ENCODED rows (see module doc)."""

    def __init__(self, tokenizer_json: str, cfg: SftDataConfig, block: int, special: SpecialTokens):
        from tokenizers import Tokenizer

        self.tok, self.cfg, self.block = Tokenizer.from_str(tokenizer_json), cfg, block
        self.special = special

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: dict[str, list] = {name: [] for name in ENCODED.names}
        for key, split, where, line in zip(
            *(batch.column(c).to_pylist() for c in ("key", "split", "where", "line")), strict=True
        ):
            if not line.strip():
                continue
            if split == BY_HASH:
                split = VAL if is_val(where, self.cfg.seed, self.cfg.val_fraction) else TRAIN
            ids, mask, status, error = self._encode(line)
            for name, value in zip(
                ENCODED.names, (key, split, where, ids, mask, status, error), strict=True
            ):
                rows[name].append(value)
        return pa.table(rows, schema=ENCODED)

    def _encode(self, line: str) -> tuple[list[int], list[int], str, str]:
        try:
            obj = json.loads(line)
        except ValueError as e:
            return [], [], "bad", f"not valid JSON ({e})"
        try:  # a template's raise_exception (e.g. roles must alternate) rejects one example
            messages = parse_example(obj)
            ids, mask = encode_conversation(self.tok, messages, self.cfg.loss_on, self.special)
        except ValueError as e:
            return [], [], "bad", str(e)
        if len(ids) <= self.block:
            return ids, mask, "", ""
        if self.cfg.truncate == "drop" or not any(mask[1 : self.block]):
            return [], [], "too_long", f"{len(ids)} tokens > seq_len + 1 = {self.block}"
        return ids[: self.block], mask[: self.block], "truncated", ""


# ---------------------------------------------------------------- the whole dataset


def prepare_sft(
    cfg: SftDataConfig,
    tokenizer_json: str,
    out: str,
    seq_len: int,
    special: SpecialTokens = LMFORGE,
    use_ray: bool = True,
) -> dict[str, Any]:
    """Read, encode (on Ray Data, or in-process with use_ray=False), pack and write the SFT
    dataset under `out` (module doc); returns the manifest. Deterministic: the same inputs give
    the same bytes either way."""
    inputs = plan_inputs(cfg)
    block = seq_len + 1
    encode = _encode_with_ray if use_ray else _encode_local
    batches = encode(inputs, tokenizer_json, cfg, block, special)
    meta_columns = ["key", "split", "where", "status", "error"]
    meta = pa.concat_tables(
        list(batches(meta_columns)) or [ENCODED.empty_table().select(meta_columns)]
    )
    problems = _check_inputs(inputs, meta)
    keep = _selection(meta, cfg.max_examples, cfg.seed)
    for split in ("train", "val"):
        storage.remove(storage.join(out, split))
    tok = _tokenizer(tokenizer_json)
    pad_id = tok.token_to_id(PAD) or 0
    rows_per_table = max(1, 2**24 // block)
    packers = {s: RowPacker(block, cfg.packing, pad_id, rows_per_table) for s in (TRAIN, VAL)}
    parts = {TRAIN: 0, VAL: 0}
    val_bytes = 0  # of the val targets: the baseline bits per byte of the fine-tuned model

    def write(split: int, tables: Iterable[pa.Table]) -> None:
        for table in tables:
            name = f"{'val' if split else 'train'}/part-{parts[split]:05d}.parquet"
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd", row_group_size=min(len(table), 1024))
            storage.write_bytes(storage.join(out, name), buf.getvalue())
            parts[split] += 1

    for batch in batches(["key", "split", "tokens", "mask"]):
        for key, split, tokens, mask in zip(
            *(batch.column(c).to_pylist() for c in ("key", "split", "tokens", "mask")), strict=True
        ):
            if key in keep:
                val_bytes += loss_bytes(tok, tokens, mask) if split == VAL else 0
                write(split, packers[split].add(tokens, mask))
    for split, packer in packers.items():
        write(split, packer.finish())

    status = meta.column("status").to_pylist()
    manifest: dict[str, Any] = {
        "kind": "sft",
        "vocab_size": tok.get_vocab_size(),
        "seq_len": seq_len,
    }
    for split, name in ((TRAIN, "train"), (VAL, "val")):
        st = packers[split].stats
        manifest |= {
            f"examples_{name}": st["examples"],
            f"rows_{name}": st["rows"],
            f"tokens_{name}": st["tokens"],
            f"loss_tokens_{name}": st["loss_tokens"],
            **({"loss_bytes_val": val_bytes} if split == VAL else {}),
            f"packing_efficiency_{name}": round(st["tokens"] / max(1, st["rows"] * block), 4),
        }
    manifest |= {
        "skipped": status.count("bad"),
        "dropped_too_long": status.count("too_long"),
        "truncated": status.count("truncated"),
        "loss_on": cfg.loss_on,
        "packing": cfg.packing,
        "sources": cfg.sources,
        "val_sources": cfg.val_sources,
        "chat_template": "tokenizer" if special.chat_template else "builtin",
        "token_dtype": "int32",
        "columns": ["tokens", "loss_mask", "segments"],
        "problems": problems[:MAX_PROBLEMS],
    }
    if not manifest["rows_train"]:
        raise LmforgeError(
            f"data: no training examples ({len(status)} lines read, "
            f"{manifest['examples_val']} went to val): add sources or lower val_fraction"
        )
    storage.write_text(storage.join(out, "tokenizer.json"), tokenizer_json)
    storage.write_json(storage.join(out, "manifest.json"), manifest)
    storage.mark_success(
        out, {k: manifest[k] for k in ("examples_train", "examples_val", "rows_train")}
    )
    print(
        f"[finetune] data: {manifest['examples_train']} train / {manifest['examples_val']} val "
        f"examples in {manifest['rows_train']} / {manifest['rows_val']} rows of {block} "
        f"(packing efficiency {manifest['packing_efficiency_train']:.1%}); skipped "
        f"{manifest['skipped']} bad lines, dropped {manifest['dropped_too_long']} too long, "
        f"truncated {manifest['truncated']} -> {out}"
    )
    return manifest


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


Batches = Callable[[list[str]], Iterator[pa.Table]]  # the encoded rows' columns, in key order


def _encode_local(inputs, tokenizer_json, cfg, block, special) -> Batches:
    encode = EncodeExamples(tokenizer_json, cfg, block, special)
    tables = [encode(t) for item in inputs for t in read_input(item)]
    encoded = pa.concat_tables(tables or [ENCODED.empty_table()]).sort_by("key")
    return lambda columns: iter([encoded.select(columns)])


def _encode_with_ray(inputs, tokenizer_json, cfg, block, special) -> Batches:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    encoded = (
        ray.data.from_items(inputs, override_num_blocks=max(1, len(inputs)))
        .map_batches(_read_inputs_batch, batch_size=1, batch_format="pyarrow")
        .map_batches(
            EncodeExamples,
            fn_constructor_kwargs={
                "tokenizer_json": tokenizer_json,
                "cfg": cfg,
                "block": block,
                "special": special,
            },
            compute=ActorPoolStrategy(min_size=1, max_size=workers),
            batch_size=512,
            batch_format="pyarrow",
        )
        .sort("key")  # the packing order: stable keys, not Ray's block order
        .materialize()
    )
    return lambda columns: encoded.select_columns(columns).iter_batches(
        batch_size=4096, batch_format="pyarrow"
    )


def _check_inputs(inputs: list[dict[str, Any]], meta: pa.Table) -> list[str]:
    """The bad lines as 'file:line: why' (printed, at most 20); an input without one valid
    example is an error that names it."""
    problems: list[str] = []
    lines, valid, first = Counter(), Counter(), {}
    columns = (meta.column(c).to_pylist() for c in ("key", "where", "status", "error"))
    for key, where, status, error in zip(*columns, strict=True):
        index = key >> 32
        lines[index] += 1
        if status == "bad":
            problems.append(f"{where}: {error}")
            first.setdefault(index, problems[-1])
        elif status != "too_long":
            valid[index] += 1
    for p in problems[:20]:
        print(f"skipped {p}", file=sys.stderr)
    if len(problems) > 20:
        print(f"... and {len(problems) - 20} more bad lines (see manifest.json)", file=sys.stderr)
    for item in inputs:
        index = item["index"]
        if not valid[index]:
            why = (
                f"first problem: {first[index]}"
                if index in first
                else "it is empty, or every example is longer than seq_len + 1"
            )
            raise LmforgeError(
                f"{item['path']}: no valid SFT example ({lines[index]} lines; {why})"
            )
    return problems


def _selection(meta: pa.Table, max_examples: int | None, seed: int) -> set[int]:
    """Keys of the examples to pack: all valid ones, or a seeded sample of max_examples per split."""
    valid = [
        (k, s)
        for k, s, st in zip(
            *(meta.column(c).to_pylist() for c in ("key", "split", "status")), strict=True
        )
        if st in ("", "truncated")
    ]
    if max_examples is None:
        return {k for k, _ in valid}

    def rank(key: int) -> bytes:
        return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()

    keep: set[int] = set()
    for split in (TRAIN, VAL):
        keep |= set(sorted((k for k, s in valid if s == split), key=rank)[:max_examples])
    return keep
