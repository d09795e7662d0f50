"""Drift scoring as a serving GPU runs it: in the engine's dtype, logits only where there is a
target, the fp32 loss in chunks, and a budget that keeps it away from decoding (counted)."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

import lmforge.serve.drift as drift
from lmforge.data.tokenizer import train_bpe
from lmforge.model import Llama, LlamaConfig
from lmforge.serve.config import DriftConfig
from lmforge.serve.drift import DriftScorer, TokenBudget, bits_per_byte, prompt_bits_per_byte
from tests.numerics import model_terms, tolerance

WORDS = ["the", "quick", "fox", "jumps", "over", "lazy", "dog", "river", "barn", "hill"]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


@pytest.fixture(scope="module")
def model_and_tokenizer():
    rng = random.Random(0)
    tok = train_bpe([text(rng, 12) for _ in range(200)], vocab_size=300, min_frequency=1)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn_dim=128, max_seq_len=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return Llama(cfg).eval(), tok


def reference_bits(model, tok, ids: list[int]) -> tuple[float, float]:
    """The former scoring: the full (T, V) logits in fp32, one cross-entropy; and their size."""
    eos = tok.token_to_id("<|eos|>")
    tokens = torch.tensor([[eos, *ids]])
    with torch.no_grad():
        logits = model(tokens[:, :-1]).float()
        nats = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:], reduction="sum")
    n_bytes = len(tok.decode(ids, skip_special_tokens=False).encode())
    return float(nats) / math.log(2) / n_bytes, logits.abs().max().item()


def test_chunked_scores_equal_the_full_fp32_logits(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    monkeypatch.setattr(drift, "LOSS_CHUNK", 5)  # several chunks, the last one short
    ids = tok.encode(text(random.Random(1), 30), add_special_tokens=False).ids[:63]
    assert len(ids) > 12
    want, size = reference_bits(model, tok, ids)
    got = bits_per_byte(model, tok, ids)
    n_bytes = len(tok.decode(ids, skip_special_tokens=False).encode())
    # the same fp32 logits; only the loss's summation order differs (T terms of size ~ln V)
    tol = tolerance(torch.float32, terms=len(ids), magnitude=len(ids) * math.log(300))
    assert got == pytest.approx(want, abs=tol / math.log(2) / n_bytes)


def test_bf16_scores_equal_the_fp32_reference_within_bf16_rounding(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok.encode(text(random.Random(2), 20), add_special_tokens=False).ids[:63]
    want, size = reference_bits(model, tok, ids)
    bf16 = Llama(model.cfg).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    got = bits_per_byte(bf16, tok, ids)
    # per token: its logits through the network in bf16 (weights rounded too), then an fp32
    # log-softmax over V; summed over the tokens, per byte, in bits
    one = tolerance(torch.bfloat16, **model_terms(model.cfg, len(ids)), magnitude=size)
    one += tolerance(torch.float32, terms=model.cfg.vocab_size, magnitude=size)
    n_bytes = len(tok.decode(ids, skip_special_tokens=False).encode())
    assert abs(got - want) <= len(ids) * one / math.log(2) / n_bytes
    assert got != want  # it did run in bf16


def test_logits_only_for_the_positions_that_have_a_target(model_and_tokenizer):
    model, tok = model_and_tokenizer
    rows = []
    hook = model.output.register_forward_hook(lambda m, i, out: rows.append(out.shape[-2]))
    try:
        short = text(random.Random(3), 5)
        n = len(tok.encode(short, add_special_tokens=False).ids)
        prompt_bits_per_byte(model, tok, short)
        long = text(random.Random(4), 200)  # longer than the context
        prompt_bits_per_byte(model, tok, long)
    finally:
        hook.remove()
    # one row per scored token (the prefix predicts the first; the last predicts nothing)
    assert rows == [n, model.cfg.max_seq_len - 1]


class Clock:
    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps += 1
        self.now += s


def engine_of(model, tok, running: int = 0):
    return SimpleNamespace(model=model, tokenizer=tok, num_running=running, waiting=[])


def test_the_token_budget_holds_over_any_stretch_of_time():
    clock = Clock()
    budget = TokenBudget(100, clock)
    taken = []
    for step in range(1000):  # a 30-token prompt offered every 0.05 s for 50 s
        clock.now = step * 0.05
        if budget.take(30):
            taken.append((clock.now, 30))
    for start in (0.0, 10.0, 25.0):
        for length in (1.0, 5.0, 20.0):
            used = sum(n for t, n in taken if start <= t < start + length)
            # a second's worth banked, plus one prompt over the bucket's level
            assert used <= 100 * length + 100 + 30
    total = sum(n for _, n in taken)
    assert 100 * 50 - 100 <= total <= 100 * 50 + 130  # and the budget is used, not starved


def test_scoring_is_refused_past_the_budget_and_counted(model_and_tokenizer):
    model, tok = model_and_tokenizer
    clock = Clock()
    cfg = DriftConfig(max_tokens_per_s=50, idle_wait_s=0)
    scorer = DriftScorer(engine_of(model, tok), cfg, clock=clock, sleep=clock.sleep)
    prompt = text(random.Random(5), 10)
    n = len(tok.encode(prompt, add_special_tokens=False).ids)
    results = [scorer(prompt) for _ in range(20)]  # all at t = 0
    scored = [r for r in results if r is not None]
    assert len(scored) == math.ceil(50 / n) and scorer.scored_tokens == len(scored) * n
    assert scorer.refused == {"busy": 0, "budget": 20 - len(scored)}
    clock.now = 10.0  # ten seconds later the bucket is full again (one second's worth)
    assert scorer(prompt) is not None


def test_scoring_waits_for_an_idle_engine_and_gives_up_when_it_never_is(model_and_tokenizer):
    model, tok = model_and_tokenizer
    clock = Clock()
    engine = engine_of(model, tok, running=2)
    cfg = DriftConfig(max_tokens_per_s=1e6, idle_wait_s=1.0)
    scorer = DriftScorer(engine, cfg, clock=clock, sleep=clock.sleep)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert scorer(text(random.Random(6), 5)) is None  # busy for the whole second
        assert calls == [] and scorer.refused == {"busy": 1, "budget": 0}
        assert clock.sleeps == pytest.approx(1.0 / DriftScorer.POLL_S, abs=1)

        def finish_after_three_polls(s: float) -> None:
            clock.sleep(s)
            if clock.sleeps >= 3:
                engine.num_running, engine.waiting = 0, []

        clock.sleeps = 0
        engine.waiting = ["queued"]
        scorer.sleep = finish_after_three_polls
        assert scorer(text(random.Random(6), 5)) is not None
        assert clock.sleeps == 3 and calls == [1] and scorer.refused["busy"] == 1
    finally:
        hook.remove()


@pytest.mark.gpu
def test_on_a_gpu_the_engine_dtype_scores_within_bf16_rounding_of_fp32(model_and_tokenizer):
    """What a serving replica runs: the engine's model in bf16 on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, tok = model_and_tokenizer
    ids = tok.encode(text(random.Random(7), 20), add_special_tokens=False).ids[:63]
    want, size = reference_bits(model, tok, ids)
    gpu = Llama(model.cfg).eval()
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.to("cuda", torch.bfloat16)  # as load_engine does
    got = bits_per_byte(gpu, tok, ids)
    one = tolerance(torch.bfloat16, **model_terms(model.cfg, len(ids)), magnitude=size)
    one += tolerance(torch.float32, terms=model.cfg.vocab_size, magnitude=size)
    n_bytes = len(tok.decode(ids, skip_special_tokens=False).encode())
    assert abs(got - want) <= len(ids) * one / math.log(2) / n_bytes
