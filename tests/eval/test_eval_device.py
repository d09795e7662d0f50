"""Eval as a GPU runs it, checked on CPU: the dtype per device, batches sized by memory, and
generation through the KV cache giving the uncached answers token for token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge import LmforgeError
from lmforge.eval.lm import (
    CPU_BATCH_SIZE,
    CPU_BATCH_TOKENS,
    GIB,
    MAX_BATCH_SIZE,
    Scorer,
    batch_limits,
    eval_dtype,
)
from lmforge.eval.runner import batching, score_local
from lmforge.model import PRESETS, num_params
from lmforge.model.special import LMFORGE

EOS_ID = LMFORGE.prefix_id


def test_eval_runs_bf16_on_a_gpu_and_fp32_on_cpu(artifact):
    assert (
        eval_dtype("cuda")
        == eval_dtype("cuda:3")
        == eval_dtype(torch.device("cuda"))
        == (torch.bfloat16)
    )
    assert eval_dtype("cpu") == torch.float32
    scorer = Scorer.from_artifact(str(artifact))
    assert {p.dtype for p in scorer.model.parameters()} == {torch.float32}


def _requests(scorer) -> list[dict]:
    texts = ["def dumps(obj):", "import json\n", "Return the index", "x", "The class of"]
    out = []
    for i, text in enumerate(texts):
        prompt = [EOS_ID, *scorer.tokenizer.encode(text, add_special_tokens=False).ids]
        request = {"kind": "generate", "prompt": prompt, "max_new_tokens": 6 + 5 * i, "seed": i}
        out.append({**request, "stop": ["\n"] if i % 2 else []})
    return out


def test_cached_generation_equals_the_uncached_path_token_for_token(scorer):
    assert scorer.cached()
    requests = _requests(scorer)
    cached = scorer.generate_batch(requests)  # one batch: prompts of 5 lengths decode together
    uncached = [scorer.generate_uncached(r) for r in requests]
    assert cached == uncached
    assert sum(len(tokens) for tokens, _ in cached) > 20  # they did generate
    # the batch's answers do not depend on what else is in it
    assert [scorer.generate_batch([r])[0] for r in requests] == cached
    # and through score(), as the eval actors call it
    assert [r["text"] for r in scorer.score(requests)] == [text for _, text in uncached]


def test_a_mixed_precision_model_generates_without_the_cache(scorer):
    """Under autocast the cache (in the parameters' fp32) would not take bf16 keys."""
    request = _requests(scorer)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not scorer.cached()
        assert scorer.generate_batch([request]) == [scorer.generate_uncached(request)]
    assert scorer.cached()


def test_a_long_prompt_keeps_its_tail_so_the_answer_fits(scorer):
    prompt = [EOS_ID, *range(10, 10 + scorer.max_length + 50)]
    request = {"kind": "generate", "prompt": prompt, "max_new_tokens": 8}
    tokens, _ = scorer.generate_batch([request])[0]
    assert 0 < len(tokens) <= 8


def _batch_bytes(cfg, dtype, sequences, tokens, max_length):
    p = torch.finfo(dtype).bits // 8
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.max_seq_len * p
    per_token = p * (cfg.vocab_size + 6 * cfg.dim + 3 * cfg.ffn_dim)
    fixed = num_params(cfg) * p, 8 * max_length * cfg.vocab_size
    return fixed, kv * sequences, per_token * tokens, per_token, kv


@pytest.mark.parametrize("free_gib", [24, 40, 80])
def test_gpu_batches_are_the_largest_that_fit_the_free_memory(free_gib):
    cfg, max_length = PRESETS["8b"], 4096
    free = free_gib * GIB
    sequences, tokens = batch_limits(cfg, free, torch.bfloat16, max_length)
    (weights, logp), kv_bytes, token_bytes, per_token, kv = _batch_bytes(
        cfg, torch.bfloat16, sequences, tokens, max_length
    )
    budget = 0.9 * (free - weights) - GIB - logp
    assert token_bytes <= budget < token_bytes + per_token  # the most tokens that fit
    assert kv_bytes <= budget and (sequences == MAX_BATCH_SIZE or budget < kv_bytes + kv)
    assert tokens >= max_length
    # a bf16 8b on 80 GiB: ~53 GiB left for batches, ~9x the CPU default's tokens
    if free_gib == 80:
        assert tokens > 8 * CPU_BATCH_TOKENS and sequences > 3 * CPU_BATCH_SIZE


def test_batch_sizes_grow_with_free_memory_and_a_model_that_cannot_fit_is_refused():
    small = dataclasses.replace(PRESETS["1b"], vocab_size=32768)
    limits = [batch_limits(small, g * GIB, torch.bfloat16, 2048) for g in (8, 16, 64)]
    assert limits == sorted(limits) and limits[0] < limits[-1]
    with pytest.raises(LmforgeError, match="gpus_per_actor=1"):
        batch_limits(PRESETS["8b"], 24 * GIB, torch.float32, 4096)  # 32 GB of fp32 weights


def test_batching_is_fixed_on_cpu_and_the_config_wins(monkeypatch):
    import lmforge.eval.runner as runner

    def no_probe(_):
        raise AssertionError("no GPU probe")

    monkeypatch.setattr(runner, "gpu_free_bytes", no_probe)
    assert batching("unused", None, None, 0, None) == (CPU_BATCH_SIZE, CPU_BATCH_TOKENS)
    assert batching("unused", 4, None, 0, None) == (4, CPU_BATCH_TOKENS)
    assert batching("unused", 4, 999, 1, None) == (4, 999)  # set: no probe on a GPU either


def test_batching_on_a_gpu_uses_the_probed_memory(monkeypatch, artifact):
    import lmforge.eval.runner as runner
    from lmforge.model.artifact import load_model_config

    monkeypatch.setattr(runner, "gpu_free_bytes", lambda share: int(share * 10 * GIB))
    cfg = load_model_config(str(artifact))
    want = batch_limits(cfg, 5 * GIB, torch.bfloat16, 64)
    assert batching(str(artifact), None, None, 0.5, 64) == want
    assert batching(str(artifact), 3, None, 0.5, 64) == (3, want[1])


def test_score_local_defaults_to_the_cpu_batches(scorer):
    requests = _requests(scorer)[:2]
    assert score_local(scorer, requests) == scorer.score(requests)
