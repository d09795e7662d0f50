"""Generated corpora with known answers: planted duplicates and poisoned files."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "time",
    "person",
    "year",
    "way",
    "day",
    "thing",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "child",
    "eye",
    "woman",
    "place",
    "work",
    "week",
    "case",
    "point",
    "government",
    "company",
    "number",
    "group",
    "problem",
    "fact",
    "river",
    "mountain",
    "garden",
    "letter",
    "music",
    "window",
    "story",
    "table",
    "paper",
    "system",
    "program",
    "question",
    "night",
    "water",
    "city",
    "market",
    "reason",
    "result",
    "change",
    "morning",
    "evening",
    "answer",
    "teacher",
    "student",
    "doctor",
    "village",
    "engine",
    "bridge",
    "field",
    "history",
    "science",
    "language",
    "picture",
    "country",
    "family",
    "friend",
    "animal",
    "machine",
    "ocean",
    "island",
]
VERBS = [
    "makes",
    "takes",
    "finds",
    "gives",
    "tells",
    "asks",
    "works",
    "seems",
    "feels",
    "leaves",
    "calls",
    "keeps",
    "brings",
    "begins",
    "shows",
    "hears",
    "plays",
    "runs",
    "moves",
    "lives",
]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
    words.insert(2, rng.choice(VERBS))
    return "The " + " ".join(words) + "."


def document(rng: random.Random, sentences: int = 18) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def mutate(text: str, rng: random.Random, changes: int) -> str:
    """A near duplicate: `changes` words replaced."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), changes):
        words[i] = rng.choice(WORDS)
    return " ".join(words)


def planted_corpus(n_unique: int, n_exact: int, n_near: int, seed: int = 0, changes: int = 2):
    """(texts, origin): planted copies (exact: case and spacing changed; near: 1..`changes`
    words replaced) follow the unique documents; origin maps each copy to its original."""
    rng = random.Random(seed)
    texts = [document(rng) for _ in range(n_unique)]
    origin: dict[int, int] = {}
    for _ in range(n_exact):
        j = rng.randrange(n_unique)
        origin[len(texts)] = j
        texts.append(texts[j].upper().replace(" ", "  "))
    for _ in range(n_near):
        j = rng.randrange(n_unique)
        origin[len(texts)] = j
        texts.append(mutate(texts[j], rng, rng.randint(1, changes)))
    return texts, origin


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def write_poisoned(path: Path, rng: random.Random, huge_mb: int = 20) -> dict:
    """A jsonl file with one of each kind of bad record between valid ones.

    Returns the expected counts: valid documents and each reject reason.
    """
    good = [document(rng, 6) for _ in range(12)]
    lines = (
        [
            json.dumps({"text": good[0]}).encode(),
            b'{"text": "unterminated',  # bad_json
            json.dumps({"text": good[1]}).encode(),
            b'{"text": "caf\xff\xfe broken utf-8"}',  # invalid_utf8
            json.dumps({"text": good[2]}).encode(),
            json.dumps({"body": "no text field"}).encode(),  # missing_field
            json.dumps({"text": 42}).encode(),  # non_string_field
            json.dumps({"text": "   "}).encode(),  # empty
            json.dumps({"text": good[3]}).encode(),
            json.dumps({"text": "x" * (huge_mb * 2**20)}).encode(),  # record_too_large
            json.dumps([1, 2]).encode(),  # not_an_object
            b"",  # a blank line is not a record
        ]
        + [json.dumps({"text": t}).encode() for t in good[4:]]
    )
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {
        "valid": good,
        "rejects": {
            "bad_json": [2],
            "invalid_utf8": [4],
            "missing_field": [6],
            "non_string_field": [7],
            "empty": [8],
            "record_too_large": [10],
            "not_an_object": [11],
        },
    }
