"""The engine's lean path on CPU: bucketed in-place decode, chunked batched prefill, sampling
with one host transfer per step, and a cache sized from its memory budget."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.model.artifact import load_model
from lmforge.model.generate import SamplingParams
from lmforge.model.kvcache import kv_bytes_per_token
from lmforge.serve.engine import Engine, Request
from tests.numerics import model_terms, tolerance
from tests.serve.test_generate import greedy_by_recompute


@pytest.fixture(scope="module")
def parts(artifact):
    # float64: batched, padded and chunked passes then agree far below any logit gap.
    return load_model(artifact).double(), Tokenizer.from_file(f"{artifact}/tokenizer.json")


def run(engine, jobs, limit=1000):
    results = []
    for prompt, params in jobs:
        outs: list = []
        engine.submit(Request(list(prompt), params, outs.append))
        results.append(outs)
    for _ in range(limit):
        if not (engine.running or engine.waiting):
            return results
        engine.step()
    raise AssertionError("engine did not drain")


def tokens(outs):
    return [t for o in outs for t in o.tokens]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, stop_token_ids=())


def test_batched_greedy_equals_the_uncached_reference_across_buckets(parts):
    """Prompts of 1 to 70 tokens in one batch of 5 (decode batch bucket 8: three padded
    rows), generating past the 64- and 128-token window buckets' edges."""
    model, tok = parts
    torch.manual_seed(0)
    prompts = [torch.randint(7, model.cfg.vocab_size, (n,)).tolist() for n in (1, 9, 40, 60, 70)]
    lengths = [30, 50, 30, 20, 50]
    engine = Engine(model, tok, max_batch_size=8)
    got = run(engine, [(p, greedy(n)) for p, n in zip(prompts, lengths, strict=True)])
    for prompt, n, outs in zip(prompts, lengths, got, strict=True):
        assert tokens(outs) == greedy_by_recompute(model, prompt, n)


def test_a_chunked_prefill_gives_the_tokens_and_logprobs_of_an_unchunked_one(parts):
    model, tok = parts
    torch.manual_seed(1)
    long = torch.randint(7, model.cfg.vocab_size, (75,)).tolist()
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(), echo=True, logprobs=2)
    whole = run(Engine(model, tok, max_batch_size=4), [(long, params)])[0]
    # 7 prompt tokens per step: the long prompt takes 11 steps. Meanwhile another request
    # decodes in a higher slot, so the decode steps pad the long prompt's (lower) slot.
    engine = Engine(model, tok, max_batch_size=4, max_prefill_tokens=7)
    first, other = [], []
    engine.submit(Request([5, 6, 7], greedy(40), first.append))  # slot 0
    engine.submit(Request([8, 9], greedy(60), other.append))  # slot 1
    engine.step()
    engine.cancel(engine.running[0])
    engine.step()  # slot 0 is free again
    before = engine.steps
    chunked = run(engine, [(long, params)])[0]
    assert engine.steps - before >= 11 + 11  # 11 prefill steps, then 12 tokens (1 per step)
    assert engine.running == [] and tokens(other) == greedy_by_recompute(model, [8, 9], 60)
    assert tokens(chunked) == tokens(whole) == greedy_by_recompute(model, long, 12)
    echo_whole, echo_chunked = whole[0].prompt_logprobs, chunked[0].prompt_logprobs
    assert [e.token for e in echo_chunked] == long
    # A float64 model either way, then a log-softmax over the vocabulary in fp32.
    with torch.no_grad():
        size = model(torch.tensor([long])).abs().max().item()
    tol = tolerance(torch.float64, **model_terms(model.cfg, len(long)), magnitude=size)
    tol += tolerance(torch.float32, terms=model.cfg.vocab_size, magnitude=size)
    assert [e.logprob for e in echo_chunked[1:]] == pytest.approx(
        [e.logprob for e in echo_whole[1:]], abs=tol
    )
    assert [[t for t, _ in e.top] for e in echo_chunked] == [
        [t for t, _ in e.top] for e in echo_whole
    ]


def test_seeded_sampling_reproduces_whatever_the_batch_and_the_chunking(parts):
    model, tok = parts
    prompt = tok.encode("the quick brown fox jumps over the lazy dog").ids
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=5)
    alone = tokens(run(Engine(model, tok, max_batch_size=1), [(prompt, params)])[0])
    others = [(tok.encode("hello").ids, SamplingParams(max_tokens=20, seed=i)) for i in range(3)]
    engine = Engine(model, tok, max_batch_size=4, max_prefill_tokens=3)
    batched = tokens(run(engine, [*others, (prompt, params)])[-1])
    assert len(alone) == 20 and batched == alone
    reseeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=6)
    assert tokens(run(Engine(model, tok, max_batch_size=1), [(prompt, reseeded)])[0]) != alone


def test_a_decode_step_transfers_only_the_sampled_tokens_to_the_host(parts, monkeypatch):
    model, tok = parts
    engine = Engine(model, tok, max_batch_size=4)
    jobs = [
        (tok.encode("hello").ids, greedy(30)),
        (tok.encode("def add").ids, SamplingParams(max_tokens=30, temperature=0.8, seed=1)),
        (tok.encode("Paris is").ids, SamplingParams(max_tokens=30, top_p=0.9, seed=2)),
    ]
    for prompt, params in jobs:
        engine.submit(Request(list(prompt), params, lambda o: None))
    engine.step()
    engine.step()  # admitted and decoding: what follows are plain decode steps
    calls = []
    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _real=real, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for _ in range(5):
        engine.step()
    assert calls == ["tolist"] * 5 and engine.num_running == 3


def test_the_cache_gets_the_slots_its_budget_holds(parts):
    model, tok = parts
    per_slot = kv_bytes_per_token(model.cfg, torch.float64) * (model.cfg.max_seq_len + 1)
    engine = Engine(model, tok, max_batch_size=16, kv_cache_bytes=3 * per_slot)
    assert engine.max_batch_size == 3 and len(engine.free) == 3
    assert engine.cache.k.shape[1] == 3 and engine.kv_cache_bytes == 3 * per_slot
    with pytest.raises(ValueError, match="cannot hold one sequence of 128 tokens"):
        Engine(model, tok, kv_cache_bytes=per_slot - 1)


def test_the_serve_config_refuses_a_memory_fraction_above_one():
    from pydantic import ValidationError

    from lmforge.serve.config import ModelServeConfig

    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        ModelServeConfig(name="m", artifact="/a", gpu_memory_utilization=1.5)
    cfg = ModelServeConfig(name="m", artifact="/a", kv_cache_gb=1.5, max_prefill_tokens=256)
    assert (cfg.gpu_memory_utilization, cfg.cuda_graphs, cfg.max_batch_size) == (0.9, True, 64)
