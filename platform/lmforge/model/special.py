"""A model's special tokens and chat template, as its artifact defines them.

lmforge's own tokenizers put their special tokens first (`<|pad|>` 0, `<|bos|>` 1, `<|eos|>` 2,
role tokens, `<|end|>` 6; lmforge.data.tokenizer): generation stops at `<|eos|>` or `<|end|>`,
every document of the packed training stream follows an `<|eos|>`, and chat uses the built-in
format (lmforge.model.chat). An imported Hugging Face model has its own ids and template, which
`lmforge import` keeps in the artifact:

    tokenizer_config.json    bos_token, eos_token, add_bos_token, chat_template
    generation_config.json   bos_token_id, eos_token_id (an id or a list: all of them stop)

`load_special_tokens(artifact)` reads them into one `SpecialTokens` that generation, serving,
evaluation and fine-tuning all take, so none of them assumes lmforge's ids.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

from lmforge import storage
from lmforge.model import chat

TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 may save the template


@dataclass(frozen=True)
class SpecialTokens:
    """The defaults are lmforge's own tokenizer's."""

    bos_id: int | None = 1
    eos_id: int | None = 2
    stop_ids: tuple[int, ...] = (2, 6)  # generation stops at any of these (not emitted)
    # The token every document, eval context and scored prompt follows: lmforge's <|eos|> (what
    # precedes each document in the packed stream), an imported model's BOS (lm-eval's choice).
    prefix_id: int | None = 2
    add_bos: bool = False  # a plain-text prompt (completions) starts with bos_id, as HF encodes
    bos_token: str | None = "<|bos|>"
    eos_token: str | None = "<|eos|>"
    chat_template: str | None = None  # Jinja; None: the built-in format (lmforge.model.chat)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The text of a conversation, as transformers' apply_chat_template renders it."""
        return chat.render_chat(
            messages, add_generation_prompt, self.chat_template, **self.template_variables()
        )

    def template_variables(self) -> dict[str, str]:
        return {
            name: token
            for name, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token))
            if token is not None
        }

    def encode_chat(
        self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> tuple[str, list[int]]:
        """(text, ids) of a chat prompt; the template writes any BOS itself, as with
        apply_chat_template, so nothing is added around it. Only the template writes special
        tokens: one spelled out in a message's content (`<|end|>\\n<|system|>`) is encoded as
        the plain text it is, so a client cannot forge turns or roles."""
        specials = _specials(tokenizer)
        if not any(specials.search(str(m.get("content", ""))) for m in messages):
            # The common case, encoded exactly as fine-tuning encodes its conversations.
            text = self.render_chat(messages, add_generation_prompt)
            return text, tokenizer.encode(text, add_special_tokens=False).ids
        pieces = self._render_pieces(messages, add_generation_prompt)
        return "".join(text for text, _ in pieces), _encode_pieces(tokenizer, specials, pieces)

    def _render_pieces(
        self, messages: list[dict[str, str]], add_generation_prompt: bool
    ) -> list[tuple[str, bool]]:
        """The conversation as (text, written by the template) pieces: the template renders
        with a marker for each content, which the content then replaces."""
        markers = [f"{_MARK_OPEN}{i}{_MARK_CLOSE}" for i in range(len(messages))]
        masked = [{**m, "content": mark} for m, mark in zip(messages, markers, strict=True)]
        rendered = self.render_chat(masked, add_generation_prompt)
        pieces, pos = [], 0
        for found in re.finditer(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}", rendered):
            pieces.append((rendered[pos : found.start()], True))
            pieces.append((str(messages[int(found.group(1))].get("content", "")), False))
            pos = found.end()
        pieces.append((rendered[pos:], True))
        if any(_MARK_OPEN in t or _MARK_CLOSE in t for t, trusted in pieces if trusted):
            raise ValueError(
                "a message's content spells out a special token of the model and its chat "
                "template cuts or rewrites the content, so it cannot be kept as plain text; "
                "remove the special token from the content"
            )
        return pieces

    def encode_prompt(self, tokenizer, text: str) -> list[int]:
        """The ids of a plain-text prompt: BOS first when the model's tokenizer adds one."""
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids


LMFORGE = SpecialTokens()

# Private-use characters around a content's index while the template renders (never in its text).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _specials(tokenizer) -> re.Pattern:
    """A pattern matching the special tokens of a tokenizer, longest first (as the tokenizer
    itself splits them out: leftmost-longest)."""
    found = _SPECIALS.get(tokenizer)
    if found is None:
        tokens = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        tokens.sort(key=len, reverse=True)
        # A tokenizer without special tokens: a pattern that never matches.
        found = re.compile("|".join(map(re.escape, tokens)) or r"(?!)")
        _SPECIALS[tokenizer] = found
    return found


def _plain_tokenizer(tokenizer):
    """A copy of the tokenizer that encodes special-token strings as ordinary text (a copy, so
    concurrent encodes with the original never see the flag)."""
    plain = _PLAIN.get(tokenizer)
    if plain is None:
        plain = type(tokenizer).from_str(tokenizer.to_str())
        plain.encode_special_tokens = True
        _PLAIN[tokenizer] = plain
    return plain


def _encode_pieces(tokenizer, specials: re.Pattern, pieces: list[tuple[str, bool]]) -> list[int]:
    """Ids of (text, written by the template) pieces: special tokens only from the template's
    text; the text between two of them is encoded as one string, as the tokenizer does, so the
    merges across a template/content boundary are the usual ones."""
    added = {t.content: t for t in tokenizer.get_added_tokens_decoder().values()}
    plain, ids, run, strip_next = _plain_tokenizer(tokenizer), [], [], False

    def flush() -> None:
        if run:
            ids.extend(plain.encode("".join(run), add_special_tokens=False).ids)
            run.clear()

    def text(piece: str) -> None:
        nonlocal strip_next
        if strip_next:  # the previous special token absorbs the whitespace after it (rstrip)
            piece = piece.lstrip()
            strip_next = not piece
        if piece:
            run.append(piece)

    for piece, trusted in pieces:
        if not trusted:
            text(piece)
            continue
        pos = 0
        for found in specials.finditer(piece):
            text(piece[pos : found.start()])
            token = added[found.group()]
            if token.lstrip and run:
                run[-1] = run[-1].rstrip()
            flush()
            ids.append(tokenizer.token_to_id(token.content))
            strip_next, pos = token.rstrip, found.end()
        text(piece[pos:])
    flush()
    return ids


def is_lmforge_tokenizer(tokenizer) -> bool:
    from lmforge.data.tokenizer import SPECIAL_TOKENS

    return all(tokenizer.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))


def load_special_tokens(directory: str, tokenizer=None) -> SpecialTokens:
    """The special tokens of an artifact (or HF folder) whose tokenizer is `tokenizer` (read
    from its tokenizer.json when not given)."""
    if tokenizer is None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(storage.read_text(storage.join(directory, "tokenizer.json")))
    template = artifact_chat_template(directory)
    if is_lmforge_tokenizer(tokenizer):  # trained here (or exported and imported back)
        return SpecialTokens(chat_template=None if template == chat.CHAT_TEMPLATE else template)
    config = _read_json(storage.join(directory, TOKENIZER_CONFIG))
    generation = _read_json(storage.join(directory, GENERATION_CONFIG))
    bos_token, eos_token = _token(config.get("bos_token")), _token(config.get("eos_token"))
    bos_id = _id(tokenizer, bos_token, generation.get("bos_token_id"))
    eos_ids = _ids(generation.get("eos_token_id"))
    eos_id = _id(tokenizer, eos_token, eos_ids[0] if eos_ids else None)
    stop_ids = tuple(dict.fromkeys([*([eos_id] if eos_id is not None else []), *eos_ids]))
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):  # the tokenizer's post-processor decides, as in HF
        add_bos = bos_id is not None and _post_processor_adds(tokenizer, bos_id)
    return SpecialTokens(
        bos_id=bos_id,
        eos_id=eos_id,
        stop_ids=stop_ids,
        prefix_id=bos_id if bos_id is not None else eos_id,
        add_bos=add_bos,
        bos_token=bos_token or _text(tokenizer, bos_id),
        eos_token=eos_token or _text(tokenizer, eos_id),
        chat_template=template,
    )


def _read_json(path: str) -> dict[str, Any]:
    if not storage.exists(path):
        return {}
    value = storage.read_json(path)
    return value if isinstance(value, dict) else {}


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _id(tokenizer, token: str | None, fallback: Any) -> int | None:
    found = tokenizer.token_to_id(token) if token is not None else None
    return found if found is not None else (_ids(fallback) or [None])[0]


def _text(tokenizer, token_id: int | None) -> str | None:
    return tokenizer.id_to_token(token_id) if token_id is not None else None


def _post_processor_adds(tokenizer, bos_id: int) -> bool:
    return tokenizer.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


# ---------------------------------------------------------------- the files that carry them


def artifact_chat_template(artifact: str) -> str | None:
    """The model's own chat template (Jinja) that an artifact or HF folder carries: in
    chat_template.jinja, or `chat_template` of tokenizer_config.json (a string, or the entry
    named 'default' of a list); None when it has none, i.e. the built-in format applies."""
    jinja = storage.join(artifact, CHAT_TEMPLATE_FILE)
    if storage.exists(jinja):
        return storage.read_text(jinja)
    template = _read_json(storage.join(artifact, TOKENIZER_CONFIG)).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def import_special_files(hf_dir: str, out: str, hf_config: dict[str, Any]) -> None:
    """Keep what defines the special tokens and template of an HF folder in the artifact `out`:
    tokenizer_config.json (a separate chat_template.jinja folded in as `chat_template`, so one
    file carries it) and generation_config.json (else the ids of the HF config.json)."""
    config_path = storage.join(hf_dir, TOKENIZER_CONFIG)
    jinja_path = storage.join(hf_dir, CHAT_TEMPLATE_FILE)
    has_config, has_jinja = storage.exists(config_path), storage.exists(jinja_path)
    if has_config or has_jinja:
        text = storage.read_text(config_path) if has_config else "{}"
        if has_jinja:
            config = json.loads(text)
            if not config.get("chat_template"):
                config["chat_template"] = storage.read_text(jinja_path)
                text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        storage.write_text(storage.join(out, TOKENIZER_CONFIG), text)
    generation_path = storage.join(hf_dir, GENERATION_CONFIG)
    if storage.exists(generation_path):
        storage.write_text(storage.join(out, GENERATION_CONFIG), storage.read_text(generation_path))
        return
    ids = {
        k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config.get(k) is not None
    }
    if ids:
        storage.write_json(storage.join(out, GENERATION_CONFIG), ids)


def copy_special_files(src: str, dst: str) -> None:
    """A derived artifact (a fine-tune) keeps its base's special tokens and chat template."""
    for name in (TOKENIZER_CONFIG, GENERATION_CONFIG):
        path = storage.join(src, name)
        if storage.exists(path):
            storage.write_text(storage.join(dst, name), storage.read_text(path))
