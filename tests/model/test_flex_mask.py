"""Packed rows (fine-tuning) on GPU attend through a FlexAttention block mask, on CPU through a
dense (B, 1, T, T) mask: both compute the same function, and keep each document to itself.

FlexAttention runs on CPU here in its eager form (a reference implementation, forward only:
it has no backward on CPU, which is why CPU training keeps the dense mask), so the two paths
are compared on CPU in float64: equal math, up to float64 rounding (tests/numerics.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lmforge.model import Llama, model_config
from lmforge.model import llama as llama_module
from lmforge.model.llama import document_block_mask, document_mask
from tests.numerics import assert_same_math, model_terms


@pytest.fixture
def flex_on_cpu(monkeypatch):
    monkeypatch.setattr(llama_module, "FLEX_DEVICE_TYPES", ("cpu",))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def packed_rows(vocab: int):
    """Two rows: three documents and padding (id 0), and one document filling the row."""
    torch.manual_seed(0)
    lengths = [(9, 5, 12, 6), (32,)]
    tokens = torch.randint(7, vocab, (2, 32))
    segments = torch.stack(
        [
            torch.cat([torch.full((n,), i + 1 if n != 6 else 0) for i, n in enumerate(row)])
            for row in lengths
        ]
    )
    return tokens, segments, lengths


def test_the_block_mask_allows_exactly_what_the_dense_mask_allows():
    _, segments, _ = packed_rows(64)
    dense = document_mask(segments)  # (B, 1, T, T)
    block = document_block_mask(segments)
    b, q, kv = torch.meshgrid(*(torch.arange(n) for n in (2, 32, 32)), indexing="ij")
    allowed = block.mask_mod(b, torch.zeros_like(b), q, kv)
    assert torch.equal(allowed, dense[:, 0])
    assert block.shape == (2, 1, 32, 32)


def test_flex_and_dense_masks_give_the_same_logits(flex_on_cpu):
    cfg = model_config("debug")
    model = Llama(cfg).eval().double()
    tokens, segments, _ = packed_rows(cfg.vocab_size)
    with torch.no_grad():
        flex = model(tokens, segments=segments)
        llama_module.FLEX_DEVICE_TYPES = ()
        dense = model(tokens, segments=segments)
    assert_same_math(flex, dense, torch.float64, **model_terms(cfg, 32))


def test_under_flex_each_packed_document_computes_as_if_alone(flex_on_cpu):
    cfg = model_config("debug")
    model = Llama(cfg).eval().double()
    tokens, segments, lengths = packed_rows(cfg.vocab_size)
    with torch.no_grad():
        together = model(tokens, segments=segments)
        start = 0
        for n in lengths[0][:3]:
            alone = model(tokens[:1, start : start + n])[0]
            assert_same_math(
                together[0, start : start + n], alone, torch.float64, **model_terms(cfg, 32)
            )
            start += n
        # The check can see a leak: without the mask the second document sees the first.
        leaky = model(tokens)[0]
    assert not torch.allclose(leaky[9:14], together[0, 9:14], atol=1e-3)


def test_packed_rows_use_a_block_mask_only_where_flex_is_enabled(monkeypatch):
    seen = []
    original = llama_module.Attention.forward

    def recording(self, x, rope, positions=None, cache=None, mask=None):
        seen.append(type(mask).__name__)
        return original(self, x, rope, positions, cache, mask)

    monkeypatch.setattr(llama_module.Attention, "forward", recording)
    cfg = model_config("debug")
    model = Llama(cfg)
    tokens, segments, _ = packed_rows(cfg.vocab_size)
    model(tokens, segments=segments)  # with gradients: training
    assert set(seen) == {"Tensor"}  # CPU: the exact dense mask
    monkeypatch.setattr(llama_module, "FLEX_DEVICE_TYPES", ("cpu",))
    seen.clear()
    with warnings.catch_warnings(), torch.no_grad():  # FlexAttention has no backward on CPU
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        model(tokens, segments=segments)
    assert set(seen) == {"BlockMask"}
