"""Scoring with a model: log-likelihoods, rolling windows, generation with stop sequences."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmforge.eval.lm import Scorer, cut_at_stop, rolling_windows
from lmforge.eval.scoring import document_requests, encode
from lmforge.model.special import LMFORGE
from tests.numerics import loglikelihood_tolerance, tolerance

EOS_ID = LMFORGE.prefix_id  # what an lmforge model's documents and eval contexts follow


class FixedDistribution(torch.nn.Module):
    """A 'model' whose next-token distribution is the same fixed one at every position."""

    def __init__(self, probs: list[float], max_seq_len: int = 64) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.logp = torch.log(torch.tensor(probs))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        return self.logp.expand(B, T, -1).clone()


class Scripted(torch.nn.Module):
    """Emits `script[i]` as the i-th token after a prompt of `prompt_len` tokens."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=256)
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        logits = torch.zeros(B, T, self.vocab)
        logits[:, -1, self.script[T - self.prompt_len]] = 10.0
        return logits


def test_perplexity_of_a_fixed_distribution_through_the_scorer():
    probs = [0.1, 0.2, 0.3, 0.4]
    scorer = Scorer(FixedDistribution(probs), tokenizer=None)
    doc = [3, 3, 2, 1, 0, 3]
    reqs = document_requests(doc, max_length=4, item=0, slot=0, prefix=EOS_ID)  # 2 windows
    results = scorer.score(reqs)
    ll = sum(r["loglikelihood"] for r in results)
    assert sum(r["tokens"] for r in results) == len(doc)
    want = sum(math.log(probs[t]) for t in doc)
    # fp32 log-softmax over 4 values per token, summed over the document (tests/numerics.py)
    tol = tolerance(torch.float32, terms=len(doc) * len(probs), magnitude=want)
    assert ll == pytest.approx(want, abs=tol)
    assert -ll / len(doc) == pytest.approx(-want / len(doc), abs=tol / len(doc))


def test_rolling_windows_score_every_token_once_within_the_context():
    tokens = list(range(10, 33))  # 23 tokens
    for max_length in (1, 4, 7, 23, 50):
        windows = rolling_windows(tokens, max_length, EOS_ID)
        assert [t for _, cont in windows for t in cont] == tokens
        assert windows[0][0] == [EOS_ID]
        padded = [EOS_ID, *tokens]
        for ctx, cont in windows:
            assert len(ctx) + len(cont) - 1 <= max_length  # the model input fits
            # the continuation comes with exactly the tokens right before it in the document
            end = padded.index(cont[-1]) + 1
            assert ctx + cont == padded[end - len(ctx) - len(cont) : end]


def test_rolling_loss_equals_full_context_loss_when_the_text_fits(scorer):
    text = "Serialize obj to a JSON formatted str using this conversion table."
    tokens = encode(scorer.tokenizer, text)
    assert len(tokens) < scorer.max_length
    results = scorer.score(document_requests(tokens, scorer.max_length, 0, 0, EOS_ID))
    assert len(results) == 1
    with torch.no_grad():
        x = torch.tensor([[EOS_ID, *tokens]])
        logits = scorer.model(x[:, :-1]).float()
        full = -torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
    assert results[0]["loglikelihood"] == pytest.approx(
        full, abs=loglikelihood_tolerance(scorer.model.cfg, logits)
    )
    # and with windows shorter than the text, every token is still scored exactly once
    short = scorer.score(document_requests(tokens, 5, 0, 0, EOS_ID))
    assert sum(r["tokens"] for r in short) == len(tokens)


def test_right_padding_does_not_change_scores(scorer):
    a = {
        "kind": "loglikelihood",
        "context": [EOS_ID, 50, 60, 70, 80, 90],
        "continuation": [100, 110],
    }
    b = {"kind": "loglikelihood", "context": [EOS_ID, 51], "continuation": [120]}
    alone = [scorer.score([a])[0], scorer.score([b])[0]]
    together = scorer.score([a, b])
    with torch.no_grad():
        logits = scorer.model(torch.tensor([a["context"] + a["continuation"]]))
    for x, y in zip(alone, together, strict=True):
        assert x["loglikelihood"] == pytest.approx(
            y["loglikelihood"], abs=loglikelihood_tolerance(scorer.model.cfg, logits)
        )


def test_greedy_generation_stops_at_a_stop_sequence(scorer):
    tok = scorer.tokenizer
    script = encode(tok, "returns the value. Then more") + [EOS_ID] * 4
    prompt = [EOS_ID, *encode(tok, "json.dumps(obj)\n\n")]
    fake = Scorer(Scripted(script, len(prompt), tok.get_vocab_size()), tok)
    request = {"kind": "generate", "prompt": prompt, "max_new_tokens": 40, "seed": 0}
    assert fake.score([{**request, "stop": [". "]}])[0]["text"] == "returns the value"
    # no stop sequence: runs to <|eos|>
    assert fake.score([{**request, "stop": []}])[0]["text"] == "returns the value. Then more"
    # the token limit
    assert len(encode(tok, fake.generate({**request, "max_new_tokens": 2}))) == 2
    assert cut_at_stop("a. b\n\nc", ["\n\n", ". "]) == "a"


def test_bits_per_byte_of_text_split_into_documents_differently(scorer):
    from lmforge.eval.metrics import count_bytes, language_modelling

    tok = scorer.tokenizer
    whole = "Return the index where to insert item x in list a. Serialize obj to a JSON string."
    parts = [
        "Return the index where to insert item x in list a.",
        " Serialize obj to a JSON string.",
    ]
    assert encode(tok, whole) == encode(tok, parts[0]) + encode(tok, parts[1])

    def bpb(s: Scorer, docs: list[str]) -> float:
        lls, toks = [], []
        for i, doc in enumerate(docs):
            res = s.score(document_requests(encode(tok, doc), s.max_length, i, 0, EOS_ID))
            lls.append(sum(r["loglikelihood"] for r in res))
            toks.append(sum(r["tokens"] for r in res))
        return language_modelling(lls, toks, [count_bytes(d) for d in docs])["bits_per_byte"].value

    # A model that ignores context: the same tokens, the same bytes, the same bits-per-byte.
    probs = torch.softmax(
        torch.randn(tok.get_vocab_size(), generator=torch.Generator().manual_seed(0)), 0
    )
    context_free = Scorer(FixedDistribution(probs.tolist()), tok)
    want = bpb(context_free, [whole])
    tokens = len(encode(tok, whole))  # fp32 log-softmaxes over the vocabulary, summed
    tol = tolerance(torch.float32, terms=tokens * len(probs), magnitude=want)
    assert bpb(context_free, parts) == pytest.approx(want, abs=tol)
    # A model that uses context scores the second part without the first: a different value.
    assert bpb(scorer, parts) != pytest.approx(bpb(scorer, [whole]), rel=1e-4)
