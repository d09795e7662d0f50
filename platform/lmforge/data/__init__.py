"""The `data` stage: raw text -> cleaned, filtered, deduplicated, tokenized, packed Parquet shards.

Modules, in the order a document meets them: `sources` (list the input files), `readers` (read
them, with per-record rejects; the `builtin:python-docs` corpus lives in `lmforge.builtin`),
`steps` (clean / filter / PII, one interface), `dedup` (exact + MinHash LSH across the whole
dataset), `tokenizer` (BPE), `pack` (tokenize and pack into seq_len + 1 blocks), `pipeline` (the
Ray Data operators), `stage` (runs them in order; manifest, summary), `command` (`lmforge data
prepare`).
"""
