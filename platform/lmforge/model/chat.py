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
An imported model has its own Jinja template instead; `render_chat` renders either, as
transformers' apply_chat_template does (lmforge.model.special picks the model's).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

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


@lru_cache(maxsize=4)
def _jinja(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    # As transformers' apply_chat_template renders it.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    return env.from_string(template)


def render_chat(
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
    template: str | None = None,
    **variables: str,
) -> str:
    """A conversation as text: with a Jinja chat template (a model's own, see
    lmforge.model.special), or the built-in format."""
    if template is None:
        return render(messages, add_generation_prompt)
    return _jinja(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )
