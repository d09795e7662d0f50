"""The KV cache: sizing from the config and dtype, the refusal, in-place reads, padding, the
head on kept positions only; and incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.tokenizer import train_bpe
from lmforge.model import Llama, LlamaConfig, model_config
from lmforge.model.generate import TextTracker, forward, last_positions
from lmforge.model.kvcache import (
    CPU_KV_CACHE_BYTES,
    DecodeRunner,
    KVCache,
    bucket,
    fit_slots,
    kv_budget,
    kv_bytes_per_token,
)
from tests.numerics import assert_same_math, model_terms

CFG = LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(CFG).double().eval()


def test_bytes_per_token_follow_the_config_and_dtype():
    # 1b: 16 layers x 8 KV heads x head dim 64, keys and values: 32 KiB per token in bf16.
    assert kv_bytes_per_token(model_config("1b"), torch.bfloat16) == 2 * 16 * 8 * 64 * 2
    # 8b: 32 layers x 8 KV heads x head dim 128: 128 KiB per token in bf16, twice in fp32.
    assert kv_bytes_per_token(model_config("8b"), torch.bfloat16) == 131072
    assert kv_bytes_per_token(model_config("8b"), torch.float32) == 2 * 131072


def test_slots_are_what_fits_and_at_most_the_cap():
    per_slot = kv_bytes_per_token(CFG, torch.float32) * (512 + 1)  # + the scratch column
    assert fit_slots(CFG, torch.float32, 512, 10 * per_slot, cap=64) == 10
    assert fit_slots(CFG, torch.float32, 512, 10 * per_slot - 1, cap=64) == 9
    assert fit_slots(CFG, torch.float32, 512, 10**12, cap=64) == 64
    # 8b at 8k in bf16 takes 1 GiB per sequence: 64 sequences do not fit 40 GiB.
    cfg8b = model_config("8b")
    assert fit_slots(cfg8b, torch.bfloat16, 8192, 40 * 2**30, cap=64) == 39


def test_a_budget_below_one_sequence_is_refused_in_one_line():
    per_slot = kv_bytes_per_token(CFG, torch.float32) * 513
    with pytest.raises(ValueError, match=r"cannot hold one sequence of 512 tokens") as e:
        fit_slots(CFG, torch.float32, 512, per_slot - 1, cap=16)
    assert "\n" not in str(e.value) and "gpu_memory_utilization" in str(e.value)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        fit_slots(CFG, torch.float32, 512, -5, cap=16)  # what a GPU budget is when all is used


def test_the_cpu_budget_is_fixed_and_a_given_budget_wins():
    assert kv_budget(torch.device("cpu"), None, 0.9, reserve_bytes=0) == CPU_KV_CACHE_BYTES
    assert kv_budget(torch.device("cpu"), 12345, 0.9, reserve_bytes=0) == 12345


def test_buckets_are_powers_of_two_capped():
    assert [bucket(n, 48) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    assert bucket(3, 512, 64) == 64 and bucket(65, 512, 64) == 128 and bucket(500, 300, 64) == 300


def test_prefill_returns_logits_of_the_kept_positions_only(model):
    torch.manual_seed(1)
    prompts = [torch.randint(0, CFG.vocab_size, (n,)).tolist() for n in (9, 3, 14)]
    cache = KVCache(CFG, slots=4, dtype=torch.float64)
    last = forward(model, cache, [2, 0, 3], prompts, [0, 0, 0], keep=last_positions(prompts))
    assert last.shape == (3, CFG.vocab_size) and last.dtype == torch.float32
    with torch.no_grad():
        for row, prompt in zip(last, prompts, strict=True):
            want = model(torch.tensor([prompt]))[0, -1].float()
            assert_same_math(row, want, torch.float64, **model_terms(CFG, 14))
    # Every position of one row, none of another, the last of the third: (9 + 0 + 1, V).
    some = forward(model, cache, [2, 0, 3], prompts, [0, 0, 0], keep=[range(9), [], [13]])
    assert some.shape == (10, CFG.vocab_size)


def test_padding_never_touches_real_cache_entries(model):
    torch.manual_seed(2)
    short, long = [5, 6, 7], torch.randint(0, CFG.vocab_size, (20,)).tolist()
    alone = KVCache(CFG, slots=2, dtype=torch.float64)
    forward(model, alone, [1], [short], [0])
    together = KVCache(CFG, slots=2, dtype=torch.float64)
    forward(model, together, [1, 0], [short, long], [0, 0])  # short padded to 20
    # Equal up to float64 rounding (other matmul shapes), nothing like a padding write.
    assert_same_math(together.k[:, 1, :, :3], alone.k[:, 1, :, :3], torch.float64, terms=64)
    assert not together.k[:, 1, :, 3:-1].any()  # only the scratch column took the padding
    # A decode step over slots 0..1 with slot 0 idle (padding): slot 0's keys stay as they were.
    before = together.k[:, 0].clone()
    DecodeRunner(model, together)([None, 9], [None, 3])
    assert torch.equal(together.k[:, 0, :, :-1], before[:, :, :-1])


def test_decode_reads_the_cache_in_place(model, monkeypatch):
    """The decode step's keys are a view of the cache tensor, not a copy of the used part."""
    cache = KVCache(CFG, slots=4, dtype=torch.float64)
    forward(model, cache, [0, 1], [[1, 2, 3], [4, 5]], [0, 0])
    seen = []
    layer_cls = type(cache[0])
    update = layer_cls.update

    def spy(self, k, v, positions):
        keys, values, mask = update(self, k, v, positions)
        seen.append((keys.untyped_storage().data_ptr(), keys.shape, mask.shape))
        return keys, values, mask

    monkeypatch.setattr(layer_cls, "update", spy)
    DecodeRunner(model, cache)([7, 8], [3, 2])
    storage = cache.k.untyped_storage().data_ptr()
    assert all(ptr == storage for ptr, _, _ in seen)
    _, shape, mask = seen[0]
    assert shape == (2, CFG.n_kv_heads, 64, CFG.head_dim) and mask == (2, 1, 1, 64)


TEXTS = [
    "naïve café, déjà vu, Straße, smørrebrød",
    "日本語のテキストと中文字符 — mixed with English",
    "emoji 🙂🚀 and combining e\u0301 and ZWJ 👩\u200d💻",
] * 10


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, vocab_size=300, min_frequency=2)


@pytest.mark.parametrize("text", [TEXTS[0], TEXTS[1], TEXTS[2], "🙂🙂 日本 ok"])
def test_incremental_detokenization_equals_the_full_decode(tok, text):
    ids = tok.encode(text).ids
    assert len(ids) > len(text.encode()) // 4  # multi-byte characters span several tokens
    tracker = TextTracker(tok)
    deltas = [tracker.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)  # an incomplete character is held back
    assert "".join(deltas) + tracker.flush() == tok.decode(ids) == text


def test_an_unfinished_character_at_the_end_is_flushed_as_the_full_decode_has_it(tok):
    ids = tok.encode("a🙂").ids
    cut = ids[:-1]  # stops inside the emoji's bytes
    tracker = TextTracker(tok)
    streamed = "".join(tracker.add(t) for t in cut)
    assert streamed + tracker.flush() == tok.decode(cut)


def test_stop_strings_across_multibyte_tokens(tok):
    ids = tok.encode("déjà vu, Straße").ids
    tracker = TextTracker(tok, stop=["Straß"])
    streamed = "".join(tracker.add(t) for t in ids if not tracker.stopped)
    assert tracker.stopped and streamed == tracker.text == "déjà vu, "


def test_cached_attention_folds_query_groups_instead_of_repeating_keys(model, monkeypatch):
    """With a mask, SDPA's grouped-query path is its math kernel, which copies every cached key
    H/K times; the cache hands SDPA equal head counts (queries folded), keys as a cache view."""
    from lmforge.model import kvcache

    calls = []
    real = kvcache.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, kwargs))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(kvcache.F, "scaled_dot_product_attention", spy)
    cache = KVCache(CFG, slots=2, dtype=torch.float64)
    forward(model, cache, [0, 1], [[1, 2, 3], [4, 5, 6]], [0, 0])
    DecodeRunner(model, cache)([7, 8], [3, 3])
    G = CFG.n_heads // CFG.n_kv_heads
    assert len(calls) == 2 * CFG.n_layers
    (q_prefill, k_prefill, kw), (q_decode, k_decode, _) = calls[0], calls[-1]
    assert k_decode == (2, CFG.n_kv_heads, 64, CFG.head_dim)
    assert q_prefill == (2, CFG.n_kv_heads, G * 3, CFG.head_dim) and k_prefill[1] == CFG.n_kv_heads
    assert q_decode == (2, CFG.n_kv_heads, G, CFG.head_dim) and "enable_gqa" not in kw
