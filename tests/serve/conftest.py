"""A tiny served model: random weights (scaled up so greedy choices are clear-cut, not near-ties)
and a small byte-level BPE, saved as a real artifact."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from lmforge.data.tokenizer import train_bpe
from lmforge.model import Llama, LlamaConfig
from lmforge.model.artifact import save_artifact

# Tiny matmuls: one thread is fastest, and the machine is shared.
torch.set_num_threads(1)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "def add(a, b):\n    return a + b",
    "Paris is the capital of France. Rome is the capital of Italy.",
] * 20


def make_artifact(path, seed: int = 0, max_seq_len: int = 128) -> str:
    tok = train_bpe(TEXTS, vocab_size=300, min_frequency=1)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        max_seq_len=max_seq_len,
    )
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # sharper logits: greedy decoding is stable across batch shapes
    save_artifact(str(path), model.state_dict(), cfg, tokenizer_json=tok.to_str())
    return str(path)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("served") / "model")


@contextlib.contextmanager
def live_server(app):
    """Serve an ASGI app with uvicorn on a free local port in a thread; yield its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
