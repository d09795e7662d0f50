"""The engine on a CUDA GPU: batched greedy tokens equal one-at-a-time ones; bf16 runs seeded."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.model.artifact import load_model
from lmforge.model.generate import SamplingParams
from lmforge.serve.engine import Engine, Request

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def run(engine, jobs):
    results = []
    for prompt, params in jobs:
        outs: list = []
        engine.submit(Request(list(prompt), params, outs.append))
        results.append(outs)
    while engine.running or engine.waiting:
        engine.step()
    return [[t for o in outs for t in o.tokens] for outs in results]


def test_cuda_continuous_batching_equals_one_at_a_time(artifact):
    model = load_model(artifact, device="cuda")  # fp32: no bf16 near-ties in the comparison
    tok = Tokenizer.from_file(f"{artifact}/tokenizer.json")
    texts = ["hello", "the quick brown fox", "def add(a, b):", "Paris is", "x"]
    jobs = [
        (tok.encode(t).ids, SamplingParams(max_tokens=n, temperature=0, stop_token_ids=()))
        for t, n in zip(texts, [5, 17, 9, 30, 12], strict=True)
    ]
    alone = [run(Engine(model, tok, max_batch_size=1), [job])[0] for job in jobs]
    assert run(Engine(model, tok, max_batch_size=3), jobs) == alone


def test_cuda_bf16_seeded_sampling_is_reproducible_across_batches(artifact):
    model = load_model(artifact, device="cuda").to(torch.bfloat16)
    tok = Tokenizer.from_file(f"{artifact}/tokenizer.json")
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=5)
    prompt = tok.encode("the quick brown fox").ids
    alone = run(Engine(model, tok, max_batch_size=1), [(prompt, params)])[0]
    others = [(tok.encode("hello").ids, SamplingParams(max_tokens=20, seed=i)) for i in range(3)]
    batched = run(Engine(model, tok, max_batch_size=4), [*others, (prompt, params)])[-1]
    assert len(alone) == 20 and batched == alone


def test_cuda_graph_decode_equals_eager_and_is_captured_per_bucket(artifact):
    model = load_model(artifact, device="cuda")
    tok = Tokenizer.from_file(f"{artifact}/tokenizer.json")
    texts = ["hello", "the quick brown fox", "def add(a, b):", "Paris is", "x"]
    jobs = [
        (tok.encode(t).ids, SamplingParams(max_tokens=n, temperature=0, stop_token_ids=()))
        for t, n in zip(texts, [5, 70, 9, 30, 12], strict=True)
    ]
    graphs = Engine(model, tok, max_batch_size=8, cuda_graphs=True)
    eager = Engine(model, tok, max_batch_size=8, cuda_graphs=False)
    assert run(graphs, jobs) == run(eager, jobs)
    # Batches of 5 down to 1 row (buckets 8, 4, 2, 1), windows of 64 and 128 positions.
    assert {span for _, span in graphs.decoder.graphs} == {64, 128}
    assert not eager.decoder.graphs
