"""A small packed dataset made exactly as the data contract says, without running the data stage:
real English prose (the docstrings of a few standard-library modules), a byte-level BPE trained
on it with the contract's special tokens, packed into seq_len + 1 blocks joined by <|eos|>."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

MODULES = ["argparse", "collections", "json", "pathlib", "typing", "dataclasses", "functools"]


def stdlib_docs() -> list[str]:
    import importlib

    docs = []
    for name in MODULES:
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    return docs


def make_packed_data(
    out: Path,
    seq_len: int = 64,
    vocab_size: int = 384,
    rows_per_group: int = 16,
    val_fraction: float = 0.1,
) -> Path:
    from lmforge.data.tokenizer import SPECIAL_TOKENS, train_bpe

    docs = stdlib_docs()
    tok = train_bpe(docs, vocab_size=vocab_size, min_frequency=0)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    n_val = max(2, int(len(docs) * val_fraction))
    manifest = {"seq_len": seq_len, "vocab_size": tok.get_vocab_size(), "token_dtype": "uint16"}
    manifest["special_tokens"] = {s.strip("<|>"): i for i, s in enumerate(SPECIAL_TOKENS)}
    for split, split_docs in (("val", docs[:n_val]), ("train", docs[n_val:])):
        ids: list[int] = []
        for enc in tok.encode_batch(split_docs):
            ids += enc.ids + [2]  # documents joined with <|eos|>
        blocks = len(ids) // (seq_len + 1)
        arr = np.asarray(ids[: blocks * (seq_len + 1)], dtype=np.uint16)
        (out / split).mkdir(exist_ok=True)
        col = pa.FixedSizeListArray.from_arrays(pa.array(arr), seq_len + 1)
        pq.write_table(
            pa.table({"tokens": col}),
            out / split / "part-00000.parquet",
            row_group_size=rows_per_group,
        )
        used = blocks * (seq_len + 1) / max(1, len(ids))
        manifest[f"blocks_{split}"] = blocks
        manifest[f"tokens_{split}"] = blocks * (seq_len + 1)
        manifest[f"bytes_{split}"] = int(sum(len(d.encode()) for d in split_docs) * used)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "_SUCCESS").write_text("{}")
    return out


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: deterministic, and no OpenMP spinning on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory) -> Path:
    return make_packed_data(tmp_path_factory.mktemp("data") / "data-fixture")


def tiny_train_config(data: Path, runs: Path, **sections) -> dict:
    """A debug-preset config that trains in seconds on CPU; sections override whole keys."""
    cfg = {
        "name": "t",
        "runs_dir": str(runs),
        "model": {"preset": "debug"},
        "data": {"path": str(data)},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "global_batch_tokens": 512,
            "micro_batch_size": 2,
            "max_steps": 8,
            "log_every": 1,
            "eval_every": 4,
            "eval_sequences": 8,
            "precision": "fp32",
            "peak_tflops": 0.1,
        },
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "resources": {"num_workers": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def pretrained_base(root: Path, steps: int = 12) -> Path:
    """A debug-preset model pretrained for a few steps in this process (one thread): the artifact
    that fine-tuning and improvement tests start from."""
    import torch

    from lmforge.train.config import TrainConfig
    from lmforge.train.loop import run_local

    data = make_packed_data(root / "data")
    cfg = tiny_train_config(
        data, root, resources={"num_workers": 1}, parallel={"fsdp": False},
        train={"max_steps": steps, "eval_every": 0}, checkpoint={"every_steps": 0},
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_local(TrainConfig.model_validate(cfg), str(root / "pretrain"))
    finally:
        torch.set_num_threads(before)
    return root / "pretrain" / "model"
