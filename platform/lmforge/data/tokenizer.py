"""The tokenizer: a byte-level BPE trained with HF `tokenizers`, or an existing one loaded.

The special tokens are the first ids, in the order of the data contract, so every later stage
(training, chat fine-tuning, serving) can rely on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from lmforge import ConfigError, storage

SPECIAL_TOKENS = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
EOS = "<|eos|>"


def special_token_ids() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, length: int | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def tokenizer_file(path: str) -> str:
    """The tokenizer.json of a file path or an HF tokenizer folder."""
    return storage.join(path, "tokenizer.json") if storage.is_dir(path) else path


def load_tokenizer(path: str):
    """Load a tokenizer.json (or folder); a missing file or wrong special ids is a ConfigError."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    try:
        tok = Tokenizer.from_str(storage.read_text(file))
    except FileNotFoundError:
        raise ConfigError(f"tokenizer.path: no tokenizer.json at {file}") from None
    except Exception as e:  # tokenizers raises its own Exception subclass for bad JSON
        raise ConfigError(f"tokenizer.path: cannot load {file}: {e}") from None
    wrong = [
        f"{t}={tok.token_to_id(t)}"
        for t, i in special_token_ids().items()
        if tok.token_to_id(t) != i
    ]
    if wrong:
        raise ConfigError(
            f"tokenizer.path: {file} must have the lmforge special tokens as ids 0..6 "
            f"({', '.join(SPECIAL_TOKENS)}); found {', '.join(wrong)}"
        )
    return tok


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "int32"
