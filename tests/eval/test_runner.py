"""The Ray Data actor pool: 2 actors give exactly the numbers of 1 actor (and of this process)."""

from __future__ import annotations

import pytest
import torch

from lmforge.eval.runner import make_batches, score_distributed, score_local
from lmforge.eval.scoring import build_requests
from lmforge.eval.tasks import resolve_task
from tests.numerics import loglikelihood_tolerance


def mixed_requests(tokenizer, max_length: int) -> list[dict]:
    gen = {"max_new_tokens": 3, "temperature": 0.0, "top_k": None, "seed": 0}
    requests = []
    for name, limit in (
        ("stdlib-module-mc", 4),
        ("stdlib-heldout-text", 2),
        ("stdlib-docstring-gen", 2),
    ):
        spec = resolve_task(f"builtin:{name}").model_copy(update={"limit": limit})
        from lmforge.eval.tasks import load_items

        requests += build_requests(spec, load_items(spec), tokenizer, max_length, gen)
    return requests


def test_batches_are_a_pure_function_of_the_requests():
    reqs = [
        {"kind": "loglikelihood", "context": [2] * n, "continuation": [5]} for n in (3, 9, 1, 9)
    ]
    reqs.append({"kind": "generate", "prompt": [2, 3]})
    assert make_batches(reqs, 2) == [[1, 3], [0, 2], [4]]


@pytest.mark.ray
@pytest.mark.slow
def test_two_actors_give_the_same_numbers_as_one(ray_local, artifact, scorer):
    requests = mixed_requests(scorer.tokenizer, scorer.max_length)
    assert {r["kind"] for r in requests} == {"loglikelihood", "generate"}
    one = score_distributed(str(artifact), requests, batch_size=4, num_actors=1)
    two = score_distributed(str(artifact), requests, batch_size=4, num_actors=2)
    assert one == two  # exactly, not approximately
    local = score_local(scorer, requests, batch_size=4)
    # The longest scored input bounds every request's fp32 rounding (tests/numerics.py).
    scored = [r["context"] + r["continuation"] for r in requests if r["kind"] == "loglikelihood"]
    longest = max(scored, key=len)[-scorer.max_length :]
    with torch.no_grad():
        logits = scorer.model(torch.tensor([longest]))
    tol = loglikelihood_tolerance(scorer.model.cfg, logits)
    for a, b in zip(one, local, strict=True):
        if "text" in a:
            assert a == b
        else:
            assert a["loglikelihood"] == pytest.approx(b["loglikelihood"], abs=tol)


def test_batches_are_bounded_by_padded_tokens():
    reqs = [
        {"kind": "loglikelihood", "context": [2] * n, "continuation": [5]} for n in (9, 3, 3, 3)
    ]
    # the first batch pads to 10 tokens: two requests fit in 20, three do not
    assert make_batches(reqs, 8, max_batch_tokens=20) == [[0, 1], [2, 3]]
    assert make_batches(reqs, 8, max_batch_tokens=5) == [[0], [1], [2], [3]]  # never empty
    assert make_batches(reqs, 8) == [[0, 1, 2, 3]]
