"""Config of the `data` stage: sources, steps, dedup, tokenizer, packing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from lmforge.config import NOT_HASHED, StrictModel
from lmforge.data.steps import StepConfig, default_steps
from lmforge.stage import StageConfig

BUILTIN_PREFIX = "builtin:"


class SourceConfig(StrictModel):
    path: str = Field(
        description="`builtin:python-docs`, or a file, directory or glob (local path or URI: "
        "s3://, gs://, file://) of .txt, .jsonl/.json (optionally .gz/.zst), .parquet, .csv or "
        ".arrow files (a Hugging Face `save_to_disk` folder is a folder of .arrow files); with the "
        "web extra, .html files and .warc(.gz) archives (main text by trafilatura); with the hf "
        "extra, `hf:NAME`, a Hugging Face hub dataset (downloaded to the HF cache, then read as "
        "its .arrow files)."
    )
    name: str | None = Field(
        None,
        description="Name of this source in ids, rejects and the manifest (default: the path). "
        "Document ids hash name + relative file path + line, so moving the data keeps them stable.",
    )
    format: Literal["auto", "txt", "jsonl", "json", "parquet", "csv", "arrow", "html", "warc"] = (
        Field("auto", description="File format; auto picks it from each file's extension.")
    )
    text_field: str = Field(
        "text", description="Field (JSON) or column (Parquet, CSV) that holds the document text."
    )
    txt_mode: Literal["file", "line", "paragraph"] = Field(
        "file",
        description=".txt files: one document per file, per line, or per blank-line-separated paragraph.",
    )
    weight: float = Field(
        1.0,
        ge=0,
        description="Mixing weight: each document is packed floor(w) times plus once more with "
        "probability frac(w) (chosen by its id hash, so deterministically); below 1 it downsamples.",
    )
    limit: int | None = Field(
        None, ge=1, description="Read at most this many records from this source (in file order)."
    )
    hf_config: str | None = Field(
        None,
        description="`hf:NAME` sources: the dataset's configuration (subset), if it has several.",
    )
    hf_split: str = Field("train", description="`hf:NAME` sources: the split to read.")
    hf_revision: str | None = Field(
        None,
        description="`hf:NAME` sources: the dataset revision to read, best a commit sha (a branch "
        "or tag is resolved to its commit). Unset: the default branch's current commit, which a "
        "rerun may not see again (a warning names it); the manifest records the commit read.",
    )

    @property
    def is_builtin(self) -> bool:
        return self.path.startswith(BUILTIN_PREFIX)

    @property
    def label(self) -> str:
        return self.name or self.path


class DedupConfig(StrictModel):
    exact: bool = Field(
        True,
        description="Drop documents whose normalised text (lowercased, whitespace collapsed) is identical.",
    )
    near: bool = Field(True, description="Drop near-duplicates found by MinHash LSH.")
    ngram: int = Field(5, ge=1, description="Shingle size for MinHash, in units of `ngram_unit`.")
    ngram_unit: Literal["word", "char"] = Field(
        "word", description="Shingles are word n-grams or character n-grams."
    )
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations per document.")
    threshold: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Estimated Jaccard similarity at or above which two documents are duplicates.",
    )
    bands: int | None = Field(
        None,
        ge=1,
        description="LSH bands; with `rows` unset both are chosen to minimise 0.2 x false positives + "
        "0.8 x false negatives at `threshold` (datasketch's method; candidates are verified after).",
    )
    rows: int | None = Field(
        None, ge=1, description="LSH rows per band (bands * rows <= num_perm)."
    )
    seed: int = Field(1, description="Seed of the MinHash permutations.")

    @model_validator(mode="after")
    def _bands_rows(self) -> DedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("dedup.bands and dedup.rows are set together (or both left unset)")
        if self.bands and self.rows and self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"dedup.bands * dedup.rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}"
            )
        return self


class TokenizerConfig(StrictModel):
    path: str | None = Field(
        None,
        description="Use this tokenizer.json (or HF tokenizer folder holding one) instead of "
        "training; its first ids must be the lmforge special tokens.",
    )
    vocab_size: int = Field(
        8192, ge=300, le=1_000_000, description="Vocabulary size of the trained byte-level BPE."
    )
    min_frequency: int = Field(
        2, ge=1, description="BPE merges need at least this many occurrences."
    )
    sample_mb: float = Field(
        64,
        gt=0,
        description="Train on about this many MB of cleaned text, chosen by document id hash.",
    )


class DataConfig(StageConfig):
    name: str = Field(
        "data",
        description="Run name (output goes to <runs_dir>/data/<name>-<hash>).",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    )
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(path="builtin:python-docs")],
        min_length=1,
        description="Where the documents come from (a list; see docs/data.md).",
    )
    steps: list[Annotated[StepConfig, Field(discriminator="step")]] = Field(
        default_factory=default_steps,
        description="Cleaning, filter and PII steps, applied in order (each `{step: NAME, ...}`).",
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Deduplication.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer.")
    seq_len: int = Field(
        1024, ge=8, description="Training sequence length; blocks hold seq_len + 1 tokens."
    )
    val_fraction: float = Field(
        0.01, ge=0, lt=1, description="Fraction of documents (by id hash) that go to val/."
    )
    shard_size_mb: float = Field(
        128, gt=0, description="Target size of one Parquet shard of token blocks."
    )
    max_record_mb: float = Field(
        8,
        gt=0,
        description="A record (line, file, row) larger than this is rejected as record_too_large unread.",
    )
    num_workers: int | None = Field(
        None,
        ge=1,
        description="Actors per actor pool (steps, tokenizer); default: the cluster's CPUs.",
        json_schema_extra=NOT_HASHED,
    )
    batch_size: int = Field(
        512, ge=1, description="Documents per Ray Data batch.", json_schema_extra=NOT_HASHED
    )
