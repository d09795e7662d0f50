"""Metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from lmforge.eval import metrics as M


def test_language_modelling_of_a_fixed_distribution():
    # Two documents of 3 and 5 tokens, every token with probability 1/4: loss ln 4, perplexity 4.
    lls = [3 * math.log(0.25), 5 * math.log(0.25)]
    out = M.language_modelling(lls, tokens=[3, 5], n_bytes=[6, 10], words=[2, 2])
    assert out["loss"].value == pytest.approx(math.log(4))
    assert out["perplexity"].value == pytest.approx(4.0)
    # 8 tokens x 2 bits over 16 bytes = 1 bit per byte; byte perplexity 2^1
    assert out["bits_per_byte"].value == pytest.approx(1.0)
    assert out["byte_perplexity"].value == pytest.approx(2.0)
    # 16 bits over 4 words: 4 bits per word, word perplexity 2^4
    assert out["word_perplexity"].value == pytest.approx(16.0)
    # Every document has the same per-token and per-byte rate: no spread, zero standard error.
    assert out["loss"].stderr == pytest.approx(0.0, abs=1e-12)
    assert out["bits_per_byte"].stderr == pytest.approx(0.0, abs=1e-12)
    assert out["loss"].n == 2


def test_bits_per_byte_is_a_corpus_ratio_not_a_mean_of_documents():
    # Same total log-likelihood and bytes, regrouped into other documents: same bits-per-byte.
    whole = M.language_modelling([-30.0], [10], [40])
    split = M.language_modelling([-10.0, -20.0], [3, 7], [25, 15])
    assert split["bits_per_byte"].value == pytest.approx(whole["bits_per_byte"].value)
    assert split["loss"].value == pytest.approx(whole["loss"].value)
    # ... whereas a mean of per-document rates would differ (10/25 vs 20/15 nats per byte).
    assert (10 / 25 + 20 / 15) / 2 / math.log(2) != pytest.approx(whole["bits_per_byte"].value)


def test_words_and_bytes_are_counted_as_lm_eval_does():
    assert M.count_words("a b  c\nd") == 4
    assert M.count_bytes("café") == 5  # é is two bytes in UTF-8


def test_accuracy_with_sample_stderr():
    m = M.accuracy([1, 0, 2, 1], [1, 1, 2, 1])
    assert m.value == 0.75
    # sample variance of [1, 0, 1, 1] is 0.25; stderr = sqrt(0.25 / 4)
    assert m.stderr == pytest.approx(0.25)
    assert m.n == 4


def test_choice_predictions_raw_and_length_normalised():
    lls = [[-4.0, -6.0], [-3.0, -3.0]]
    choices = [["ab", "abcdef"], ["x", "y"]]
    raw, norm = M.choice_predictions(lls, choices)
    assert raw == [0, 0]  # a tie goes to the first choice
    assert norm == [1, 0]  # -4/2 = -2 < -6/6 = -1


def test_token_f1_and_exact_match_on_known_strings():
    # normalised: "cat sat on mat" vs "cat sat on hat" -> 3 common of 4 and 4
    assert M.token_f1_score("The cat sat on the mat.", ["A cat sat on a hat"]) == pytest.approx(
        0.75
    )
    # best over references; precision 1, recall 2/4 -> 2/3
    assert M.token_f1_score("red fox", ["blue whale", "red fox jumps high"]) == pytest.approx(2 / 3)
    assert M.token_f1_score("", ["something"]) == 0.0
    assert M.exact_match_score("The Answer!", ["answer"]) == 1.0
    assert M.exact_match_score("an answer too", ["answer"]) == 0.0


def test_macro_f1_on_known_labels():
    preds = ["a", "a", "b", "b", "c"]
    gold = ["a", "b", "b", "b", "c"]
    # a: tp 1 fp 1 fn 0 -> 2/3;  b: tp 2 fp 0 fn 1 -> 4/5;  c: 1
    m = M.macro_f1(preds, gold)
    assert m.value == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    assert m.n == 5 and m.stderr is not None and m.stderr > 0
    assert M.macro_f1(preds, gold).stderr == m.stderr  # the bootstrap is seeded
    # a class only ever predicted (never gold) counts with F1 0
    assert M.macro_f1(["a", "z"], ["a", "a"]).value == pytest.approx((2 / 3 + 0) / 2)


def test_wilson_interval():
    low, high = M.proportion_ci(8, 10)
    assert (low, high) == (pytest.approx(0.4901625, abs=1e-6), pytest.approx(0.9433178, abs=1e-6))
    low, high = M.proportion_ci(0, 5)
    assert low == 0.0 and 0 < high < 0.5
