"""Metrics: pure functions of per-item results, each returning a value, its standard error and n.

Definitions follow lm-evaluation-harness, so the numbers can be cross-checked against it:

- Language modelling, over documents d with summed next-token log-likelihood LL(d) (natural
  log), T(d) predicted tokens, B(d) UTF-8 bytes and W(d) words (`len(re.split(r"\\s+", d))`):
  loss = -sum LL / sum T (nats/token), perplexity = exp(loss),
  bits_per_byte = -sum LL / sum B / ln 2, byte_perplexity = exp(-sum LL / sum B),
  word_perplexity = exp(-sum LL / sum W). These are corpus-level ratios (sums first, then
  divide), so splitting a text into documents changes them only through what the model is
  conditioned on, never through the weighting.
- Standard errors: for means, the sample standard deviation / sqrt(n) (lm-eval's `mean_stderr`);
  for the corpus ratios, the linearised (delta-method) standard error of a ratio estimator over
  documents, mapped through exp for the perplexities; for macro-F1, a seeded bootstrap.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

LN2 = math.log(2)


@dataclass(frozen=True)
class Metric:
    value: float
    stderr: float | None
    n: int
    ci: tuple[float, float] | None = None  # a 95% confidence interval, where one is reported

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.ci is None:
            del out["ci"]
        else:
            out["ci"] = list(self.ci)
        return out


def mean_stderr(values: Sequence[float]) -> Metric:
    """Mean with sample-stddev / sqrt(n) as standard error (None below 2 samples)."""
    n = len(values)
    if n == 0:
        return Metric(float("nan"), None, 0)
    mean = sum(values) / n
    if n < 2:
        return Metric(mean, None, n)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Metric(mean, math.sqrt(var / n), n)


def ratio_stderr(num: Sequence[float], den: Sequence[float]) -> tuple[float, float | None]:
    """R = sum(num) / sum(den) and its linearised standard error over the n (num, den) pairs."""
    n, total_den = len(num), sum(den)
    ratio = sum(num) / total_den if total_den else float("nan")
    if n < 2 or not total_den:
        return ratio, None
    mean_den = total_den / n
    resid = sum((y - ratio * x) ** 2 for y, x in zip(num, den, strict=True))
    return ratio, math.sqrt(resid / (n * (n - 1))) / mean_den


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word_perplexity."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def language_modelling(
    loglikelihoods: Sequence[float],
    tokens: Sequence[int],
    n_bytes: Sequence[int] | None = None,
    words: Sequence[int] | None = None,
) -> dict[str, Metric]:
    """loss, perplexity, and (given bytes / words per document) bits_per_byte, byte_ and word_perplexity."""
    nll = [-ll for ll in loglikelihoods]
    n = len(nll)
    loss, loss_se = ratio_stderr(nll, tokens)
    out = {
        "loss": Metric(loss, loss_se, n),
        "perplexity": Metric(math.exp(loss), _exp_se(loss, loss_se), n),
    }
    if n_bytes is not None:
        per_byte, per_byte_se = ratio_stderr(nll, n_bytes)
        out["bits_per_byte"] = Metric(
            per_byte / LN2, None if per_byte_se is None else per_byte_se / LN2, n
        )
        out["byte_perplexity"] = Metric(math.exp(per_byte), _exp_se(per_byte, per_byte_se), n)
    if words is not None:
        per_word, per_word_se = ratio_stderr(nll, words)
        out["word_perplexity"] = Metric(math.exp(per_word), _exp_se(per_word, per_word_se), n)
    return out


def _exp_se(x: float, se: float | None) -> float | None:
    return None if se is None else math.exp(x) * se  # delta method: d/dx exp(x) = exp(x)


# ---------------------------------------------------------------- multiple choice


def choice_predictions(
    loglikelihoods: Sequence[Sequence[float]], choices: Sequence[Sequence[str]]
) -> tuple[list[int], list[int]]:
    """argmax of each item's choice log-likelihoods, raw and divided by the choice's length in
    characters (lm-eval's acc_norm). Ties go to the lowest index."""
    raw = [_argmax(lls) for lls in loglikelihoods]
    norm = [
        _argmax([ll / max(1, len(c)) for ll, c in zip(lls, cs, strict=True)])
        for lls, cs in zip(loglikelihoods, choices, strict=True)
    ]
    return raw, norm


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def accuracy(predictions: Sequence[int | str], answers: Sequence[int | str]) -> Metric:
    return mean_stderr([float(p == a) for p, a in zip(predictions, answers, strict=True)])


def macro_f1(
    predictions: Sequence[str], answers: Sequence[str], bootstrap: int = 1000, seed: int = 1234
) -> Metric:
    """Unweighted mean of per-class F1 over the classes seen in answers or predictions (as
    sklearn's f1_score(average="macro")); the standard error is a seeded bootstrap."""
    n = len(answers)
    value = _macro_f1(predictions, answers)
    if n < 2:
        return Metric(value, None, n)
    rng = random.Random(seed)
    samples = []
    for _ in range(bootstrap):
        idx = [rng.randrange(n) for _ in range(n)]
        samples.append(_macro_f1([predictions[i] for i in idx], [answers[i] for i in idx]))
    mean = sum(samples) / len(samples)
    se = math.sqrt(sum((s - mean) ** 2 for s in samples) / (len(samples) - 1))
    return Metric(value, se, n)


def _macro_f1(predictions: Sequence[str], answers: Sequence[str]) -> float:
    labels = sorted(set(answers) | set(predictions))
    if not labels:
        return float("nan")
    scores = []
    for label in labels:
        tp = sum(p == label and a == label for p, a in zip(predictions, answers, strict=True))
        fp = sum(p == label and a != label for p, a in zip(predictions, answers, strict=True))
        fn = sum(p != label and a == label for p, a in zip(predictions, answers, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- generation


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def token_f1_score(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 over normalised whitespace tokens, the best over the references."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in references:
        gold = normalize_answer(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ---------------------------------------------------------------- bias probes


def proportion_ci(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); sane at 0, n and small n."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
