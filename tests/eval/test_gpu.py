"""The CUDA path of the scorer (what an actor with gpus_per_actor > 0 runs): in fp32 the same
numbers as CPU; in bf16 (what eval runs on a GPU) within bf16's rounding of them."""

from __future__ import annotations

import pytest
import torch

from lmforge.eval.lm import Scorer, rolling_windows
from lmforge.model.special import LMFORGE
from tests.numerics import model_terms, tolerance

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def scorers(artifact):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from lmforge.model.artifact import load_model

    cpu = Scorer.from_artifact(str(artifact))
    bf16 = Scorer.from_artifact(str(artifact), device="cuda")
    fp32 = Scorer(load_model(str(artifact), device="cuda"), cpu.tokenizer, device="cuda")
    return cpu, fp32, bf16


def _requests(cpu):
    text = "Serialize obj to a JSON formatted str using this conversion table. " * 4
    tokens = cpu.tokenizer.encode(text, add_special_tokens=False).ids
    requests = [
        {"kind": "loglikelihood", "context": c, "continuation": t}
        for c, t in rolling_windows(tokens, 16, LMFORGE.prefix_id)
    ]
    requests.append(
        {"kind": "generate", "prompt": [LMFORGE.prefix_id, *tokens[:10]], "max_new_tokens": 8}
    )
    return requests


def test_cuda_log_likelihoods_and_generation_match_cpu(scorers):
    cpu, fp32, bf16 = scorers
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.cached() and next(fp32.model.parameters()).is_cuda
    requests = _requests(cpu)
    on_cpu, on_gpu, in_bf16 = cpu.score(requests), fp32.score(requests), bf16.score(requests)
    for a, b in zip(on_cpu[:-1], on_gpu[:-1], strict=True):
        assert b["loglikelihood"] == pytest.approx(a["loglikelihood"], rel=1e-3, abs=1e-3)
        assert a["tokens"] == b["tokens"]
    assert on_gpu[-1] == on_cpu[-1]
    # bf16: each of a continuation's n tokens through the network in bf16 (weights rounded
    # too), then a log-softmax in fp32 over the vocabulary
    cfg = cpu.model.cfg
    with torch.no_grad():
        size = cpu.model(torch.tensor([requests[0]["continuation"]])).abs().max().item()
    for a, b in zip(on_cpu[:-1], in_bf16[:-1], strict=True):
        one = tolerance(torch.bfloat16, **model_terms(cfg, 16), magnitude=size)
        one += tolerance(torch.float32, terms=cfg.vocab_size, magnitude=size)
        assert abs(b["loglikelihood"] - a["loglikelihood"]) <= a["tokens"] * one
    # in bf16 the cache's prefill is the uncached path's first forward, shape for shape: the
    # first token is the same (later steps run other kernels, so near-ties may round apart)
    gen = requests[-1]
    cached, uncached = bf16.generate_batch([gen])[0][0], bf16.generate_uncached(gen)[0]
    assert cached[:1] == uncached[:1]
