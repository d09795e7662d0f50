"""The built-in chat format: one place that fine-tuning, export and serving share.

A conversation is rendered as role-tagged turns, each closed by `<|end|>`:

    <|system|>
    You are terse.<|end|>
    <|user|>
    What does os.getcwd do?<|end|>
    <|assistant|>
    Return the current working directory.<|end|>

Generation stops at `<|end|>` (or `<|eos|>`). The role tokens are special tokens of every
tokenizer the data stage trains, so they are single ids and never appear in plain text.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
END = "<|end|>"

# The same format as a Jinja template, for `tokenizer_config.json` (transformers' and vLLM's
# `apply_chat_template`); `render` below is its reference implementation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The text of a conversation in the built-in format (what CHAT_TEMPLATE produces)."""
    parts = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        parts.append(f"<|{role}|>\n{message.get('content', '')}{END}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)
