"""One chat conversation -> token ids and a loss mask.

A conversation is rendered with the model's own chat template when its artifact has one
(`lmforge.model.special`, rendered with Jinja as transformers does) or else the built-in format
(`lmforge.model.chat`), tokenized once, and each token marked 1 when it is a training target:
the assistant turns' text and their closing end token (`loss_on: assistant`), only the last
assistant turn (`last_turn`) or everything (`all`); never a role header or a user turn. The
model's EOS (a target) follows a conversation that ends with an assistant turn, unless the
template already closed it with a stop id. The model's prefix token (not a target) precedes it:
lmforge's `<|eos|>`, or an imported model's BOS (unless its template writes it); every
pretraining document and every `lmforge eval` prompt starts after that token, so fine-tuning
sees the same start.
"""

from __future__ import annotations

from typing import Any, Literal

from lmforge import LmforgeError
from lmforge.model import chat
from lmforge.model.special import LMFORGE, SpecialTokens

LossOn = Literal["assistant", "all", "last_turn"]


def parse_example(obj: Any) -> list[dict[str, str]]:
    """The messages of one JSONL record; a ValueError says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in chat.ROLES:
                raise ValueError(f"messages[{i}]: role must be one of {', '.join(chat.ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: 'content' must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant turn: nothing to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["completion"]},
        ]
    raise ValueError("expected {'messages': [...]} or {'prompt': str, 'completion': str}")


def assistant_spans(
    messages: list[dict[str, str]], special: SpecialTokens = LMFORGE
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span of each assistant turn in it: what rendering
    messages[:i + 1] adds to messages[:i] with the generation prompt (the role header), i.e.
    the content and its end token, without trailing whitespace."""
    text = special.render_chat(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = special.render_chat(messages[:i], True)
        upto = special.render_chat(messages[: i + 1], False)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise LmforgeError(
                f"chat template: rendering messages[:{i + 1}] does not extend messages[:{i}] "
                "with the generation prompt, so the assistant turn cannot be located; use a "
                "template that renders each turn independently (or the built-in one)"
            )
        spans.append((len(prefix), len(upto.rstrip())))
    return text, spans


def encode_conversation(
    tokenizer, messages: list[dict[str, str]], loss_on: LossOn, special: SpecialTokens = LMFORGE
) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation: mask 1 on the tokens the loss covers (see module doc)."""
    text, spans = assistant_spans(messages, special)
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    if loss_on == "all":
        mask = [1] * len(ids)
    else:
        counted = spans[-1:] if loss_on == "last_turn" else spans
        mask = [int(any(a <= start < b for a, b in counted)) for start, _ in enc.offsets]
    eos, start = special.eos_id, special.prefix_id
    ended = bool(ids) and ids[-1] in special.stop_ids  # the template closed it with a stop id
    if messages[-1]["role"] == "assistant" and eos is not None and not ended:
        ids.append(eos)
        mask.append(1)
    if start is not None and ids[:1] != [start]:
        # The conversation starts after the model's prefix (lmforge's <|eos|>, an imported
        # model's BOS unless its template writes it), as every pretraining document and every
        # `lmforge eval` prompt does, so the model sees the same context.
        ids.insert(0, start)
        mask.insert(0, 0)
    return ids, mask


def loss_bytes(tokenizer, ids: list[int], mask: list[int]) -> int:
    """UTF-8 bytes of the target tokens of an example (each run of them decoded together;
    special tokens such as the end of a turn count no bytes, as <|eos|> in pretraining)."""
    total, run = 0, []
    for token, target in zip([*ids, None], [*mask, 0], strict=True):
        if target:
            run.append(token)
        elif run:
            total += len(tokenizer.decode(run, skip_special_tokens=True).encode("utf-8"))
            run = []
    return total
