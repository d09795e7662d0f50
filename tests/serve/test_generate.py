"""The KV cache and sampling of lmforge.model.generate against full recomputation."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.model.artifact import load_model
from lmforge.model.generate import (
    KVCache,
    SamplingParams,
    TextTracker,
    forward,
    generate,
)
from tests.numerics import assert_same_math, model_terms


@pytest.fixture(scope="module")
def model_and_tok(artifact):
    return load_model(artifact), Tokenizer.from_file(f"{artifact}/tokenizer.json")


def greedy_by_recompute(model, prompt, n):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def test_cached_logits_equal_a_full_forward_pass(artifact):
    # In float64: the test is about the cache's math, not fp32 rounding (tests/numerics.py).
    model = load_model(artifact).double()
    torch.manual_seed(0)
    seq = torch.randint(7, model.cfg.vocab_size, (2, 20))
    cache = KVCache(model.cfg, slots=4, dtype=torch.float64)
    # Two rows in slots 3 and 1: prefill 12 tokens each, then decode the rest one at a time.
    got = [forward(model, cache, [3, 1], seq[:, :12].tolist(), [0, 0])]
    for t in range(12, 20):
        got.append(forward(model, cache, [3, 1], seq[:, t : t + 1].tolist(), [t, t]))
    with torch.no_grad():
        want = model(seq).float()  # `forward` hands out fp32 logits
    bound = model_terms(model.cfg, seq_len=20)
    assert_same_math(torch.cat(got, dim=1), want, torch.float64, **bound, stored_as=torch.float32)


def test_greedy_generate_equals_recomputation(model_and_tok):
    model, tok = model_and_tok
    prompts = [tok.encode(t).ids for t in ("hello world", "the quick brown fox jumps", "def")]
    params = SamplingParams(max_tokens=15, temperature=0, stop_token_ids=())
    results = generate(model, tok, prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        assert result["tokens"] == greedy_by_recompute(model, prompt, 15)
        assert result["finish_reason"] == "length"


def test_seeded_sampling_is_independent_of_the_batch(model_and_tok):
    model, tok = model_and_tok
    prompts = [tok.encode(t).ids for t in ("hello world", "the quick", "def add")]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=7)
    together = generate(model, tok, prompts, params)
    alone = generate(model, tok, prompts[1:2], params)
    assert together[1]["tokens"] == alone[0]["tokens"]
    other_seed = generate(model, tok, prompts[1:2], SamplingParams(max_tokens=12, seed=8))
    assert other_seed[0]["tokens"] != alone[0]["tokens"]


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(model_and_tok, params):
    model, tok = model_and_tok
    prompt = [tok.encode("the quick brown").ids]
    greedy = generate(model, tok, prompt, SamplingParams(max_tokens=10, temperature=0))
    sampled = generate(
        model, tok, prompt, SamplingParams(max_tokens=10, temperature=1.5, seed=3, **params)
    )
    assert sampled[0]["tokens"] == greedy[0]["tokens"]


def test_text_tracker_cuts_at_stop_strings_and_never_streams_them(model_and_tok):
    _, tok = model_and_tok
    text = "hello world, the quick brown fox"
    ids = tok.encode(text).ids
    tracker = TextTracker(tok, stop=["quick"])
    streamed = "".join(tracker.add(t) for t in ids if not tracker.stopped)
    assert tracker.stopped
    assert tracker.text == "hello world, the "
    assert streamed == tracker.text  # the held-back prefix of "quick" was never sent
    plain = TextTracker(tok)
    assert "".join(plain.add(t) for t in ids) + plain.flush() == text


@pytest.mark.parametrize(
    "params, expected",
    [
        (dict(temperature=1.0), [0.5, 0.3, 0.15, 0.05]),
        (dict(temperature=1.0, top_p=0.8), [0.625, 0.375, 0.0, 0.0]),
        (dict(temperature=1.0, top_k=3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (dict(temperature=0.5), [p * p / 0.365 for p in (0.5, 0.3, 0.15, 0.05)]),
    ],
)
def test_sampling_frequencies_follow_the_truncated_distribution(params, expected):
    from lmforge.model.generate import make_generator, sample_batch

    n = 4000
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(n, 4)
    gens = [make_generator(seed) for seed in range(n)]
    tokens = sample_batch(logits, [SamplingParams(**params)] * n, gens)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / n
    assert freq.tolist() == pytest.approx(expected, abs=0.03)
