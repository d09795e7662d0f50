"""Document steps: small, one interface, counters built in.

A step sees one document's text and returns `Outcome(text, reason, counts)`: the (possibly
rewritten) text, a drop reason or None to keep it, and named counts of what it changed (e.g.
PII replacements). `StepRunner` applies the configured list to each Ray Data batch and records,
per document, which step dropped it and why and what it counted; the stage turns that into
kept/dropped counters per step and reason, and each step's counts summed (manifest and summary
table), and into rejects/. A step's config is a small
StrictModel whose `step` literal names it; add a step by writing both and listing the config in
`STEP_CONFIGS` (docs/data.md shows an example).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from typing import Any, ClassVar, Literal, NamedTuple, Union

from pydantic import Field

from lmforge.config import StrictModel


class Outcome(NamedTuple):
    text: str
    reason: str | None = None
    counts: dict[str, int] | None = None


class Step:
    """Base of every step: `process(text) -> Outcome`."""

    name: ClassVar[str]

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def process(self, text: str) -> Outcome:
        raise NotImplementedError


class Filter(Step):
    """A step that only keeps or drops: `reason(text)` is None to keep, else the drop reason."""

    def reason(self, text: str) -> str | None:
        raise NotImplementedError

    def process(self, text: str) -> Outcome:
        return Outcome(text, self.reason(text))


# ---------------------------------------------------------------- normalize

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_SPACES = re.compile(r"[ \t]{2,}")


class NormalizeConfig(StrictModel):
    step: Literal["normalize"] = Field(description="Unicode and whitespace cleanup.")
    form: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normal form.")
    collapse_spaces: bool = Field(
        False,
        description="Collapse runs of spaces/tabs inside lines (off: keeps code indentation).",
    )
    max_blank_lines: int = Field(
        1, ge=0, description="Keep at most this many consecutive blank lines."
    )


class Normalize(Step):
    """NFC, control characters and zero-width spaces removed, CRLF -> LF, trailing spaces
    and runs of blank lines trimmed, the document stripped."""

    name = "normalize"

    def process(self, text: str) -> Outcome:
        out = text if self.cfg.form == "none" else unicodedata.normalize(self.cfg.form, text)
        out = out.replace("\r\n", "\n").replace("\r", "\n")
        out = _CONTROL.sub("", out)
        out = _TRAILING_SPACE.sub("\n", out)
        if self.cfg.collapse_spaces:
            out = _SPACES.sub(" ", out)
        keep = self.cfg.max_blank_lines + 1  # newlines in a row
        out = re.sub(f"\n{{{keep + 1},}}", "\n" * keep, out).strip()
        return Outcome(out, None if out else "empty", {"changed": int(out != text)})


# ---------------------------------------------------------------- length


class LengthConfig(StrictModel):
    step: Literal["length"] = Field(description="Document length limits.")
    min_chars: int = Field(50, ge=0, description="Drop documents shorter than this (characters).")
    max_chars: int = Field(
        1_000_000, ge=1, description="Drop documents longer than this (characters)."
    )
    min_words: int = Field(10, ge=0, description="Drop documents with fewer words.")
    max_words: int = Field(100_000, ge=1, description="Drop documents with more words.")


class Length(Filter):
    name = "length"

    def reason(self, text: str) -> str | None:
        c = self.cfg
        if len(text) < c.min_chars:
            return "too_few_chars"
        if len(text) > c.max_chars:
            return "too_many_chars"
        words = len(text.split())
        if words < c.min_words:
            return "too_few_words"
        if words > c.max_words:
            return "too_many_words"
        return None


# ---------------------------------------------------------------- quality (Gopher / C4 / FineWeb)

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")


class QualityConfig(StrictModel):
    step: Literal["quality"] = Field(
        description="Heuristic quality filters after Gopher (Rae et al. 2021), C4 and FineWeb."
    )
    min_mean_word_length: float = Field(3.0, ge=0, description="Gopher: mean word length >= 3.")
    max_mean_word_length: float = Field(10.0, gt=0, description="Gopher: mean word length <= 10.")
    max_symbol_word_ratio: float = Field(
        0.1, ge=0, description="Gopher: ('#' + '...' / '…') per word <= 0.1."
    )
    min_alpha_word_fraction: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Gopher: fraction of words with an alphabetic character >= 0.8.",
    )
    max_ellipsis_line_fraction: float = Field(
        0.3, ge=0, le=1, description="Gopher/C4: fraction of lines ending in an ellipsis <= 0.3."
    )
    max_duplicate_line_fraction: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Gopher: fraction of non-empty lines that repeat an earlier one <= 0.3.",
    )
    max_top_ngram_fraction: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="Gopher: characters covered by the most frequent word n-gram, as a fraction of all word characters, per n.",
    )


class Quality(Filter):
    name = "quality"

    def reason(self, text: str) -> str | None:
        c = self.cfg
        words = _WORD.findall(text)
        if not words:
            return "no_words"
        mean_len = sum(map(len, words)) / len(words)
        if mean_len < c.min_mean_word_length:
            return "mean_word_length_low"
        if mean_len > c.max_mean_word_length:
            return "mean_word_length_high"
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / len(words) > c.max_symbol_word_ratio:
            return "symbol_word_ratio"
        if sum(1 for w in words if _ALPHA.search(w)) / len(words) < c.min_alpha_word_fraction:
            return "alpha_word_fraction"
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if lines:
            ellipsis = sum(1 for ln in lines if ln.endswith(("...", "\u2026")))
            if ellipsis / len(lines) > c.max_ellipsis_line_fraction:
                return "ellipsis_lines"
            if (len(lines) - len(set(lines))) / len(lines) > c.max_duplicate_line_fraction:
                return "duplicate_lines"
        total_chars = sum(map(len, words))
        for n, limit in sorted(c.max_top_ngram_fraction.items()):
            if len(words) < n + 1:
                continue
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            gram, count = grams.most_common(1)[0]
            if count > 1 and count * sum(map(len, gram)) / total_chars > limit:
                return f"top_{n}gram_fraction"
        return None


# ---------------------------------------------------------------- word list


class WordListConfig(StrictModel):
    step: Literal["wordlist"] = Field(
        description="Drop documents containing unwanted words or phrases (a list you supply)."
    )
    words: list[str] = Field(
        default_factory=list,
        description="Words or phrases, matched case-insensitively as whole words.",
    )
    path: str | None = Field(
        None, description="A file (path or URI) with one word or phrase per line, added to `words`."
    )
    max_matches: int = Field(0, ge=0, description="Drop a document with more matches than this.")


class WordList(Filter):
    name = "wordlist"

    def __init__(self, cfg: WordListConfig) -> None:
        super().__init__(cfg)
        words = list(cfg.words)
        if cfg.path:
            from lmforge import storage

            words += storage.read_text(cfg.path).splitlines()
        words = sorted({w.strip().lower() for w in words if w.strip()}, key=len, reverse=True)
        self.pattern = (
            re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)
            if words
            else None
        )

    def reason(self, text: str) -> str | None:
        if self.pattern is None:
            return None
        for matches, _ in enumerate(self.pattern.finditer(text), 1):
            if matches > self.cfg.max_matches:
                return "wordlist"
        return None


# ---------------------------------------------------------------- PII

_EMAIL = re.compile(
    r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])"
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-]|\.\d)"
)


class PiiConfig(StrictModel):
    step: Literal["pii"] = Field(description="Replace personal data with placeholders.")
    email: str | None = Field(
        "<EMAIL>", description="Placeholder for email addresses (null: keep)."
    )
    ip: str | None = Field(
        "<IP_ADDRESS>", description="Placeholder for IPv4/IPv6 addresses (null: keep)."
    )
    phone: str | None = Field("<PHONE>", description="Placeholder for phone numbers (null: keep).")
    keep_private_ips: bool = Field(
        False, description="Leave loopback/private/documentation IPs (e.g. 127.0.0.1) as they are."
    )


def _valid_ip(text: str, keep_private: bool) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (keep_private and (ip.is_private or ip.is_loopback or ip.is_unspecified))


def _ipv6_shape(keep_private: bool):
    # `a::b` and `1::2` are valid IPv6 but far more often slices or C++ scopes in text: ask for
    # at least three colons and a digit (the loopback ::1 aside)
    def check(s: str) -> bool:
        shaped = s == "::1" or (s.count(":") >= 3 and any(ch.isdigit() for ch in s))
        return shaped and _valid_ip(s, keep_private)

    return check


class Pii(Step):
    """Emails, then IPv4/IPv6 (validated by `ipaddress`), then phone numbers (with separators,
    e.g. +1 (555) 123-4567, 020 7946 0958); counts replacements per kind."""

    name = "pii"

    def process(self, text: str) -> Outcome:
        counts = {"email": 0, "ipv4": 0, "ipv6": 0, "phone": 0}
        c = self.cfg

        def sub(kind: str, pattern: re.Pattern, placeholder: str, check=None) -> None:
            nonlocal text

            def repl(m: re.Match) -> str:
                if check and not check(m.group(0)):
                    return m.group(0)
                counts[kind] += 1
                return placeholder

            text = pattern.sub(repl, text)

        if c.email is not None:
            sub("email", _EMAIL, c.email)
        if c.ip is not None:
            sub("ipv4", _IPV4, c.ip, lambda s: _valid_ip(s, c.keep_private_ips))
            sub(
                "ipv6",
                _IPV6,
                c.ip,
                _ipv6_shape(c.keep_private_ips),
            )
        if c.phone is not None:
            sub("phone", _PHONE, c.phone, lambda s: 7 <= sum(ch.isdigit() for ch in s) <= 15)
        return Outcome(text, None, {f"pii_{k}": v for k, v in counts.items()})


# ---------------------------------------------------------------- decontamination


class DecontaminateConfig(StrictModel):
    step: Literal["decontaminate"] = Field(
        description="Drop documents that share a word n-gram with evaluation data."
    )
    paths: list[str] = Field(
        min_length=1,
        description="Eval files (path or URI): .jsonl (field `text_field`) or plain text, one example per line.",
    )
    text_field: str = Field("text", description="Field of .jsonl eval files holding the text.")
    ngram: int = Field(13, ge=3, description="n of the shared word n-gram (GPT-3 used 13).")


def _ngrams(text: str, n: int) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


class Decontaminate(Filter):
    name = "decontaminate"

    def __init__(self, cfg: DecontaminateConfig) -> None:
        import json

        from lmforge import storage

        super().__init__(cfg)
        self.grams: set[int] = set()
        for path in cfg.paths:
            for line in storage.read_text(path).splitlines():
                if path.endswith(".jsonl") and line.strip():
                    value = json.loads(line).get(cfg.text_field, "")
                    line = value if isinstance(value, str) else ""
                self.grams |= _ngrams(line, cfg.ngram)

    def reason(self, text: str) -> str | None:
        return (
            "eval_overlap"
            if self.grams and not self.grams.isdisjoint(_ngrams(text, self.cfg.ngram))
            else None
        )


# ---------------------------------------------------------------- registry and runner

STEP_CONFIGS = (
    NormalizeConfig,
    LengthConfig,
    QualityConfig,
    WordListConfig,
    PiiConfig,
    DecontaminateConfig,
)
STEP_CLASSES: dict[str, type[Step]] = {
    "normalize": Normalize,
    "length": Length,
    "quality": Quality,
    "wordlist": WordList,
    "pii": Pii,
    "decontaminate": Decontaminate,
}
StepConfig = Union[STEP_CONFIGS]  # noqa: UP007  (a runtime union of the registered configs)


def default_steps() -> list[Any]:
    return [
        NormalizeConfig(step="normalize"),
        LengthConfig(step="length"),
        QualityConfig(step="quality"),
        PiiConfig(step="pii"),
    ]


def build_steps(configs: list[Any]) -> list[Step]:
    return [STEP_CLASSES[c.step](c) for c in configs]


def step_labels(configs: list[Any]) -> list[str]:
    """Unique names for the configured steps: `quality`, or `length#2` for a repeated one."""
    seen: Counter[str] = Counter()
    labels = []
    for c in configs:
        seen[c.step] += 1
        labels.append(c.step if seen[c.step] == 1 else f"{c.step}#{seen[c.step]}")
    return labels
