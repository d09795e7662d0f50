"""A tiny model artifact made with the model package's own code: a byte-level BPE with the
data contract's special tokens, trained on a few stdlib docstrings, and a random-init debug-size
Llama (seeded), saved with `save_artifact`. Also a packed val split that matches it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def corpus() -> list[str]:
    import ast
    import inspect
    import json as json_module
    import textwrap

    docs = []
    for module in (json_module, textwrap):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            is_doc_node = isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            if is_doc_node and (doc := ast.get_docstring(node)):
                docs.append(doc)
    return docs


def make_tokenizer(vocab_size: int = 320):
    from lmforge.data.tokenizer import train_bpe

    return train_bpe(corpus(), vocab_size=vocab_size, min_frequency=0)


def make_artifact(out: Path, max_seq_len: int = 64, seed: int = 0) -> Path:
    import torch

    from lmforge.model.artifact import save_artifact
    from lmforge.model.llama import Llama, LlamaConfig

    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn_dim=64, max_seq_len=max_seq_len,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Llama(cfg)
    model.init_weights(seed)
    # A little larger than init so the logits are far from uniform and comparisons are not ties.
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(20)
    save_artifact(str(out), model.state_dict(), cfg, tok.to_str(), "name: test\n")
    return out


def make_val_split(out: Path, artifact: Path, seq_len: int = 32, blocks: int = 6) -> Path:
    from tokenizers import Tokenizer

    tok_json = (artifact / "tokenizer.json").read_text()
    tok = Tokenizer.from_str(tok_json)
    stream: list[int] = []
    n_bytes = 0
    for doc in corpus():
        stream += tok.encode(doc, add_special_tokens=False).ids + [2]
        n_bytes += len(doc.encode())
        if len(stream) >= blocks * (seq_len + 1):
            break
    kept = blocks * (seq_len + 1)
    (out / "val").mkdir(parents=True)
    arr = pa.array(np.array(stream[:kept], dtype=np.uint16))
    pq.write_table(
        pa.table({"tokens": pa.FixedSizeListArray.from_arrays(arr, seq_len + 1)}),
        out / "val" / "part-00000.parquet",
    )
    import hashlib

    manifest = {
        "tokens_val": kept,
        "bytes_val": int(n_bytes * kept / len(stream)),
        "seq_len": seq_len,
        "tokenizer_sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("eval-model") / "model")


@pytest.fixture(scope="session")
def scorer(artifact):
    from lmforge.eval.lm import Scorer

    return Scorer.from_artifact(str(artifact))
