"""The CUDA path of the scorer (what an actor with gpus_per_actor > 0 runs): same numbers as CPU."""

from __future__ import annotations

import pytest
import torch

from lmforge.eval.lm import Scorer, rolling_windows
from lmforge.model.special import LMFORGE

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def scorers(artifact):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return Scorer.from_artifact(str(artifact)), Scorer.from_artifact(str(artifact), device="cuda")


def test_cuda_log_likelihoods_and_generation_match_cpu(scorers):
    cpu, gpu = scorers
    assert next(gpu.model.parameters()).is_cuda
    text = "Serialize obj to a JSON formatted str using this conversion table. " * 4
    tokens = cpu.tokenizer.encode(text, add_special_tokens=False).ids
    requests = [
        {"kind": "loglikelihood", "context": c, "continuation": t}
        for c, t in rolling_windows(tokens, 16, LMFORGE.prefix_id)
    ]
    requests.append(
        {"kind": "generate", "prompt": [LMFORGE.prefix_id, *tokens[:10]], "max_new_tokens": 8}
    )
    on_cpu, on_gpu = cpu.score(requests), gpu.score(requests)
    for a, b in zip(on_cpu[:-1], on_gpu[:-1], strict=True):
        assert b["loglikelihood"] == pytest.approx(a["loglikelihood"], rel=1e-3, abs=1e-3)
        assert a["tokens"] == b["tokens"]
    assert on_gpu[-1] == on_cpu[-1]
