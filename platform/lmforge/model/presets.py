"""Named model sizes. A preset is a starting point: any field can be overridden (free-form sizes).

| preset | D    | layers | heads (kv) | FFN   | vocab  | tied | params     |
|--------|------|--------|------------|-------|--------|------|------------|
| debug  | 64   | 2      | 4 (2)      | 192   | 512    | yes  | ~0.1M      |
| cpu    | 256  | 4      | 4 (2)      | 768   | 2048   | no   | ~4.2M      |
| tiny   | 384  | 6      | 6 (2)      | 1024  | 8192   | yes  | ~12.6M     |
| small  | 768  | 12     | 12 (12)    | 2048  | 32000  | no   | ~134M      |
| 1b     | 2048 | 16     | 32 (8)     | 8192  | 32000  | yes  | ~1.04B     |
| 8b     | 4096 | 32     | 32 (8)     | 14336 | 128256 | no   | ~8.0B      |

`1b` and `8b` follow the Llama 3.2 1B / Llama 3 8B shapes (the 1b with a 32k vocabulary).
`cpu` is sized for minutes of training on a few CPU cores (the quickstart's pretraining): at
a fixed wall budget a model this small, trained on ~3x more tokens, reaches a lower held-out
bits-per-byte than `tiny` barely trained, and its own head (untied) is worth another 11%
(docs/training.md#cpu-preset).
The vocabulary is normally replaced by the tokenizer's size at train time.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmforge.model.llama import LlamaConfig

PRESETS: dict[str, LlamaConfig] = {
    "debug": LlamaConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256
    ),
    "cpu": LlamaConfig(
        vocab_size=2048,
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=768,
        max_seq_len=512,
        tie_embeddings=False,  # measured: val bpb 2.27 untied vs 2.57 tied, same steps (docs/training.md)
    ),
    "tiny": LlamaConfig(
        vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=512
    ),
    "small": LlamaConfig(
        vocab_size=32000,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        ffn_dim=2048,
        max_seq_len=2048,
        tie_embeddings=False,
    ),
    "1b": LlamaConfig(
        vocab_size=32000,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=8192,
        max_seq_len=4096,
        rope_theta=500000.0,
    ),
    "8b": LlamaConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
}


def model_config(preset: str | None = None, **overrides: Any) -> LlamaConfig:
    """A preset with some fields replaced (None values are ignored), or a free-form config."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}'; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else LlamaConfig()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
