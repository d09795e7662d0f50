"""Packing: EOS-joined documents cut into seq_len + 1 blocks, remainder counted, bytes kept."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.data import pack, tokenizer


def test_pack_shard_blocks_remainder_and_bytes(tmp_path):
    # three documents, given out of id order; EOS (2) follows each when packed
    docs = {30: [7, 8], 10: [10, 11, 12, 13], 20: [20, 21]}
    ids = list(docs)
    table = pa.table(
        {
            "id": ids,
            "key": [3] * 3,  # train, shard 3
            "copies": [1, 1, 1],
            "tokens": pa.array([docs[i] for i in ids], pa.list_(pa.int32())),
            "n_bytes": [30, 50, 30],
        }
    )
    row = pack.pack_shard(table, str(tmp_path), seq_len=3, eos=2, dtype="uint16").to_pylist()[0]
    # stream by id: 10 11 12 13 2 | 20 21 2 | 7 8 2  -> 11 tokens = 2 blocks of 4 + 3 left
    assert row == {
        "split": "train",
        "shard": 3,
        "file": "train/part-00003.parquet",
        "docs": 3,
        "blocks": 2,
        "tokens": 8,
        "remainder": 3,
        # doc 10 (5 tokens) whole, doc 20 (3 tokens) whole, doc 30 not at all
        "bytes": 80,
    }
    out = pq.read_table(tmp_path / "train" / "part-00003.parquet")
    assert out.schema.field("tokens").type == pa.list_(pa.uint16(), 4)
    assert out["tokens"].to_pylist() == [[10, 11, 12, 13], [2, 20, 21, 2]]


def test_split_and_shards_are_a_function_of_the_id():
    ids = np.arange(0, 10**9, 7919, dtype=np.int64)
    val = pack.split_of(ids, 0.1)
    assert 0.08 < val.mean() < 0.12
    assert (pack.split_of(ids, 0.1) == val).all()
    assert set(pack.shard_of(ids, 4).tolist()) == {0, 1, 2, 3}


def test_tokenizer_has_contract_special_tokens(tmp_path):
    texts = ["the cat sat on the mat " * 20, "dogs and cats and birds " * 20]
    tok = tokenizer.train_bpe(texts, vocab_size=300, min_frequency=1)
    assert [tok.id_to_token(i) for i in range(7)] == list(tokenizer.SPECIAL_TOKENS)
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    again = tokenizer.load_tokenizer(str(tmp_path))
    assert again.encode("the cat").ids == tok.encode("the cat").ids
    assert again.decode(tok.encode("the cat sat").ids) == "the cat sat"
    assert tokenizer.token_dtype(65535) == "uint16" and tokenizer.token_dtype(65536) == "int32"


def test_pack_shard_repeats_weighted_documents(tmp_path):
    table = pa.table(
        {
            "id": [1, 2],
            "key": [0, 0],
            "copies": [2, 1],
            "tokens": pa.array([[5, 6], [7]], pa.list_(pa.int32())),
            "n_bytes": [10, 5],
        }
    )
    row = pack.pack_shard(table, str(tmp_path), seq_len=4, eos=2, dtype="int32").to_pylist()[0]
    # the second copy is cut after 2 of its 3 tokens: 10 + 10 * 2 / 3 bytes
    assert (row["blocks"], row["remainder"], row["bytes"]) == (1, 3, 16)
    out = pq.read_table(tmp_path / "train" / "part-00000.parquet")
    assert out["tokens"].to_pylist() == [[5, 6, 2, 5, 6]]
    assert out.schema.field("tokens").type == pa.list_(pa.int32(), 5)
