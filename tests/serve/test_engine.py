"""Continuous batching: same tokens as one at a time, joins mid-batch, cancels free slots."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.model.artifact import load_model
from lmforge.model.generate import SamplingParams
from lmforge.serve.engine import Engine, EngineOverloaded, Request
from tests.numerics import model_terms, tolerance


@pytest.fixture(scope="module")
def parts(artifact):
    # float64: batched and unbatched matmuls then agree far below any logit gap.
    return load_model(artifact).double(), Tokenizer.from_file(f"{artifact}/tokenizer.json")


def collect(prompt, params):
    outs = []
    return Request(list(prompt), params, outs.append), outs


def run_until_idle(engine, limit=500):
    for _ in range(limit):
        if not (engine.running or engine.waiting):
            return
        engine.step()
    raise AssertionError("engine did not drain")


def tokens_of(outs):
    return [t for o in outs for t in o.tokens]


def test_continuous_batching_gives_the_tokens_of_one_at_a_time(parts):
    model, tok = parts
    texts = ["hello", "the quick brown fox", "def add(a, b):", "Paris is", "x", "lazy dog over"]
    lengths = [5, 17, 9, 30, 12, 3]
    jobs = [
        (tok.encode(t).ids, SamplingParams(max_tokens=n, temperature=0, stop_token_ids=()))
        for t, n in zip(texts, lengths, strict=True)
    ]
    alone = []
    for prompt, params in jobs:
        engine = Engine(model, tok, max_batch_size=1)
        request, outs = collect(prompt, params)
        engine.submit(request)
        run_until_idle(engine)
        alone.append(tokens_of(outs))
    # Batch of 3 slots for 6 requests: requests join as others leave, at every step.
    engine = Engine(model, tok, max_batch_size=3)
    batched = [collect(prompt, params) for prompt, params in jobs]
    for request, _ in batched:
        engine.submit(request)
    sizes = []
    while engine.running or engine.waiting:
        engine.step()
        sizes.append(engine.num_running)
    assert [tokens_of(outs) for _, outs in batched] == alone
    assert [len(t) for t in alone] == lengths
    assert max(sizes) == 3 and engine.free and len(engine.free) == 3


def test_a_request_arriving_mid_batch_starts_and_finishes_before_the_batch(parts):
    model, tok = parts
    engine = Engine(model, tok, max_batch_size=4)
    long_a, outs_a = collect(tok.encode("hello").ids, SamplingParams(max_tokens=40, temperature=0))
    long_b, outs_b = collect(tok.encode("def").ids, SamplingParams(max_tokens=40, temperature=0))
    long_a.params.stop_token_ids = long_b.params.stop_token_ids = ()
    engine.submit(long_a)
    engine.submit(long_b)
    for _ in range(5):
        engine.step()
    late, late_outs = collect(tok.encode("Paris").ids, SamplingParams(max_tokens=3, temperature=0))
    late.params.stop_token_ids = ()
    engine.submit(late)
    engine.step()
    assert late.started_step == 5  # admitted at the very next step, not after the batch
    engine.step()
    engine.step()
    assert late_outs[-1].finish_reason == "length" and len(tokens_of(late_outs)) == 3
    assert engine.num_running == 2 and outs_a[-1].finish_reason is None
    assert max(o.batch_size for o in late_outs) == 3


def test_cancel_frees_the_slot_for_the_next_request(parts):
    model, tok = parts
    engine = Engine(model, tok, max_batch_size=1, max_waiting=1)
    first, first_outs = collect(tok.encode("hello").ids, SamplingParams(max_tokens=50))
    second, second_outs = collect(tok.encode("def").ids, SamplingParams(max_tokens=2))
    engine.submit(first)
    engine.step()
    engine.submit(second)
    with pytest.raises(EngineOverloaded):  # one running, one waiting: the queue is full
        engine.submit(collect([5], SamplingParams())[0])
    engine.cancel(first)
    engine.step()
    assert first_outs[-1].finish_reason == "cancelled"
    assert second.started_step == 1  # took the freed slot at once
    run_until_idle(engine)
    assert second_outs[-1].finish_reason in ("length", "stop") and engine.free == [0]


def test_echo_logprobs_equal_a_full_forward_pass(parts):
    model, tok = parts
    prompt = tok.encode("the quick brown fox").ids
    engine = Engine(model, tok, max_batch_size=2)
    request, outs = collect(prompt, SamplingParams(max_tokens=0, echo=True, logprobs=2))
    engine.submit(request)
    run_until_idle(engine)
    assert len(outs) == 1 and outs[0].finish_reason == "length" and outs[0].tokens == []
    echoed = outs[0].prompt_logprobs
    assert [e.token for e in echoed] == prompt and echoed[0].logprob is None
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0]
    logp = torch.log_softmax(logits.float(), -1)
    want = [float(logp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    # A float64 model, then a log-softmax over the vocabulary in fp32 on both sides.
    size = logits.abs().max().item()
    tol = tolerance(torch.float64, **model_terms(model.cfg, len(prompt)), magnitude=size)
    tol += tolerance(torch.float32, terms=logits.shape[-1], magnitude=size)
    assert [e.logprob for e in echoed[1:]] == pytest.approx(want, abs=tol)
    assert all(len(e.top) == 2 and e.top[0][1] >= e.top[1][1] for e in echoed[1:])


def test_threaded_engine_streams_concurrent_requests(parts):
    model, tok = parts
    engine = Engine(model, tok, max_batch_size=4).start()
    params = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=())

    async def one(text):
        return [t async for o in engine.stream(tok.encode(text).ids, params) for t in o.tokens]

    async def main():
        return await asyncio.gather(*(one(t) for t in ("hello", "def", "Paris is")))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown(drain_s=1)
    assert [len(r) for r in results] == [6, 6, 6] and not engine.healthy()


def test_a_request_that_fails_alone_fails_alone_and_gives_its_slot_back(parts, monkeypatch):
    """A seed torch refuses (prefill) and a sampling call that raises for one row: those two
    requests end with an error, the others in the same batch finish, every slot comes back."""
    from lmforge.serve import engine as engine_module

    model, tok = parts
    sample = engine_module.sample_tokens

    def fragile(logits, params, gens):  # raises whenever the poisoned row is in the call
        if any(p.top_p == 0.5 for p in params):
            raise RuntimeError("sampling exploded")
        return sample(logits, params, gens)

    monkeypatch.setattr(engine_module, "sample_tokens", fragile)
    engine = Engine(model, tok, max_batch_size=4)
    greedy = SamplingParams(max_tokens=5, temperature=0, stop_token_ids=())
    bad_seed = SamplingParams(max_tokens=5, temperature=1.0, seed=2**64, stop_token_ids=())
    bad_sample = SamplingParams(max_tokens=5, top_p=0.5, stop_token_ids=())
    good_a, outs_a = collect(tok.encode("hello").ids, greedy)
    seed, outs_seed = collect(tok.encode("def").ids, bad_seed)
    sampled, outs_sampled = collect(tok.encode("Paris").ids, bad_sample)
    good_b, outs_b = collect(tok.encode("the quick").ids, greedy)
    for r in (good_a, seed, sampled, good_b):
        engine.submit(r)
    run_until_idle(engine)
    assert len(tokens_of(outs_a)) == 5 and outs_a[-1].finish_reason == "length"
    assert len(tokens_of(outs_b)) == 5 and outs_b[-1].finish_reason == "length"
    for outs, stage in ((outs_seed, "prefill"), (outs_sampled, "sampling")):
        assert [o.finish_reason for o in outs] == ["error"] and stage in outs[0].error
    assert sorted(engine.free) == [0, 1, 2, 3] and engine.last_error is None
    # And the engine still serves: the freed slots take the next batch.
    again, outs_again = collect(tok.encode("hello").ids, greedy)
    engine.submit(again)
    run_until_idle(engine)
    assert tokens_of(outs_again) == tokens_of(outs_a)


def test_a_broken_batch_step_makes_the_engine_unhealthy(parts, monkeypatch):
    model, tok = parts
    engine = Engine(model, tok, max_batch_size=2)

    def broken(tokens, positions):  # the batched decode step
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine, "decoder", broken)
    engine.start()
    params = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=())

    async def one():
        return [o async for o in engine.stream(tok.encode("hello world").ids, params)]

    try:
        assert engine.healthy()
        outs = asyncio.run(one())
        assert outs[-1].finish_reason == "error" and "illegal memory" in outs[-1].error
        assert not engine.healthy() and "illegal memory" in engine.last_error
        with pytest.raises(EngineOverloaded, match="engine is down"):
            engine.submit(collect([1, 2], params)[0])
    finally:
        engine.shutdown(drain_s=1)
