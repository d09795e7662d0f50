"""Every step and PII rule, with documents that must pass and documents that must not."""

from __future__ import annotations

import json

import pytest

from lmforge import ConfigError
from lmforge.config import load_config
from lmforge.data.config import DataConfig
from lmforge.data.steps import (
    Decontaminate,
    DecontaminateConfig,
    Length,
    LengthConfig,
    Normalize,
    NormalizeConfig,
    Pii,
    PiiConfig,
    Quality,
    QualityConfig,
    WordList,
    WordListConfig,
    step_labels,
)

PROSE = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch. "
    "Later that evening the family gathered around the table to share stories about the day, "
    "and everyone agreed that the weather had been unusually pleasant for the season."
)


def test_normalize_nfc_controls_whitespace():
    step = Normalize(NormalizeConfig(step="normalize"))
    out = step.process("  Cafe\u0301\x00 ok \r\nline two   \n\n\n\nend\u200b  ")
    assert out.text == "Caf\u00e9 ok\nline two\n\nend"
    assert out.reason is None and out.counts == {"changed": 1}
    assert step.process("\x00 \n\t").reason == "empty"
    assert step.process("clean text").counts == {"changed": 0}
    # indentation inside lines is kept unless asked otherwise
    assert step.process("a\n    indented").text == "a\n    indented"
    collapse = Normalize(NormalizeConfig(step="normalize", collapse_spaces=True))
    assert collapse.process("a  \t b").text == "a b"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("short", "too_few_chars"),
        ("x" * 300, "too_few_words"),
        (PROSE, None),
        (("word " * 200).strip(), "too_many_words"),
        ("y" * 2000, "too_many_chars"),
    ],
)
def test_length(text, reason):
    step = Length(
        LengthConfig(step="length", min_chars=50, max_chars=1500, min_words=10, max_words=150)
    )
    assert step.reason(text) == reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (PROSE, None),
        ("a b c d e f g h i j k l m n o p", "mean_word_length_low"),
        (
            " ".join(["incomprehensibilities"] * 3 + ["extraordinarily"] * 3),
            "mean_word_length_high",
        ),
        (PROSE + " # # # # # # # # # # # # # # # # # # # # # # # # #", "symbol_word_ratio"),
        (
            PROSE
            + " 12345 67890 11111 22222 33333 44444 55555 66666 77777 88888 99999 12121 34343 56565 78787 90909 13131 35353 57575 79797",
            "alpha_word_fraction",
        ),
        (
            "\n".join(f"line number {w} goes on and on..." for w in ("one", "two", "three", "four"))
            + "\n"
            + PROSE,
            "ellipsis_lines",
        ),
        ("\n".join(["the same line repeated here"] * 5 + [PROSE]), "duplicate_lines"),
        (PROSE + " " + " ".join(["buy cheap"] * 40), "top_2gram_fraction"),
    ],
)
def test_quality(text, reason):
    assert Quality(QualityConfig(step="quality")).reason(text) == reason


def test_wordlist_whole_words_case_insensitive(tmp_path):
    listed = tmp_path / "words.txt"
    listed.write_text("Forbidden Phrase\n\n")
    step = WordList(WordListConfig(step="wordlist", words=["badword"], path=str(listed)))
    assert step.reason("this has a BadWord in it") == "wordlist"
    assert step.reason("a forbidden   phrase? no: a forbidden phrase!") == "wordlist"
    assert step.reason("badwords and notbadword are other words") is None
    assert step.reason(PROSE) is None
    lenient = WordList(WordListConfig(step="wordlist", words=["fox"], max_matches=1))
    assert lenient.reason("one fox") is None and lenient.reason("fox and fox") == "wordlist"


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail jane.doe+x@example.co.uk now", "mail <EMAIL> now", "email"),
        ("server at 192.168.1.20, port 80", "server at <IP_ADDRESS>, port 80", "ipv4"),
        ("v6 2001:db8::8a2e:370:7334 here", "v6 <IP_ADDRESS> here", "ipv6"),
        ("loopback ::1 too", "loopback <IP_ADDRESS> too", "ipv6"),
        ("call +1 (555) 123-4567 today", "call <PHONE> today", "phone"),
        ("or 020 7946 0958 in London", "or <PHONE> in London", "phone"),
        ("or 555-123-4567.", "or <PHONE>.", "phone"),
    ],
)
def test_pii_positive(text, expected, kind):
    out = Pii(PiiConfig(step="pii")).process(text)
    assert out.text == expected
    assert out.counts[f"pii_{kind}"] == 1 and sum(out.counts.values()) == 1


@pytest.mark.parametrize(
    "text",
    [
        "version 3.11.2 and 1.2.3.4.5 are not addresses",
        "999.1.1.1 is not an IPv4 address",
        "dates like 2024-01-15 and times 12:30:45 stay",
        "a dict {'a': 1} and a slice x[1:2:3] and a::b stay",
        "the user@localhost form has no domain",
        "numbers 12345 and 3.14159 and 1,000,000 stay",
    ],
)
def test_pii_negative(text):
    out = Pii(PiiConfig(step="pii")).process(text)
    assert out.text == text and sum(out.counts.values()) == 0


def test_pii_counts_several_and_can_keep_private_ips():
    text = "a@b.io, c@d.org and 10.0.0.1 and 8.8.8.8"
    out = Pii(PiiConfig(step="pii")).process(text)
    assert out.counts["pii_email"] == 2 and out.counts["pii_ipv4"] == 2
    keep = Pii(PiiConfig(step="pii", keep_private_ips=True, email=None)).process(text)
    assert keep.text == "a@b.io, c@d.org and 10.0.0.1 and <IP_ADDRESS>"


def test_decontaminate(tmp_path):
    evals = tmp_path / "eval.jsonl"
    question = "what is the name of the largest planet in the solar system that we know of today"
    evals.write_text(json.dumps({"text": question}) + "\n")
    step = Decontaminate(DecontaminateConfig(step="decontaminate", paths=[str(evals)]))
    assert (
        step.reason(
            "Quiz: What is the name of the largest planet in the solar system that we know of today? Jupiter."
        )
        == "eval_overlap"
    )
    assert step.reason("what is the name of the largest planet in the solar system") is None
    assert step.reason(PROSE) is None


def test_steps_yaml_list_is_validated(tmp_path):
    cfg_file = tmp_path / "data.yaml"
    cfg_file.write_text(
        "steps:\n  - step: length\n    min_chars: 5\n  - step: length\n  - step: pii\n"
    )
    cfg = load_config(DataConfig, str(cfg_file))
    assert [s.step for s in cfg.steps] == ["length", "length", "pii"]
    assert cfg.steps[0].min_chars == 5
    assert step_labels(cfg.steps) == ["length", "length#2", "pii"]
    cfg_file.write_text("steps:\n  - step: length\n    min_char: 5\n")
    with pytest.raises(ConfigError, match="min_char"):
        load_config(DataConfig, str(cfg_file))
    cfg_file.write_text("steps:\n  - step: nosuchstep\n")
    with pytest.raises(ConfigError, match="step"):
        load_config(DataConfig, str(cfg_file))


def test_missing_step_resources_are_config_errors_before_ray(tmp_path):
    from lmforge.data.stage import run
    from lmforge.stage import StageContext

    (tmp_path / "a.txt").write_text("a document\n")
    cfg = DataConfig.model_validate(
        {
            "sources": [{"path": str(tmp_path / "a.txt")}],
            "steps": [{"step": "wordlist", "path": str(tmp_path / "missing.txt")}],
        }
    )
    with pytest.raises(ConfigError, match="steps: FileNotFoundError"):
        run(cfg, StageContext(output=str(tmp_path / "out"), address=None))
    assert not (tmp_path / "out").exists()


def test_every_step_counter_reaches_the_manifest(monkeypatch):
    """A step that counts something new finds it in manifest.json's `steps` without any
    plumbing of its own: StepRunner keeps every Outcome.counts, the block stats add them up."""
    import time

    import pyarrow as pa

    from lmforge.data import steps as steps_module
    from lmforge.data.manifest import add_up, block_stats, build_manifest
    from lmforge.data.pipeline import StepRunner
    from lmforge.data.readers import SCHEMA

    class CountingLength(Length):
        def process(self, text):
            out = super().process(text)
            return out._replace(counts={"long_words": sum(len(w) > 8 for w in text.split())})

    monkeypatch.setitem(steps_module.STEP_CLASSES, "length", CountingLength)
    cfg = load_config(DataConfig, None, [])
    docs = [PROSE, PROSE + "\r\n", "short", "Write to ann@example.org. " + PROSE]
    rows = {n: [0] * len(docs) for n in SCHEMA.names}
    rows.update(id=list(range(len(docs))), source=["s"] * 4, path=["p"] * 4, text=docs)
    rows.update(copies=[1] * 4, reject=[""] * 4, step=[""] * 4)
    out = StepRunner(cfg, bands=4, rows=2)(pa.table(rows, schema=SCHEMA))
    stats = [json.loads(row["stats"]) for row in block_stats(out).to_pylist()]
    read = add_up(stats)
    m = build_manifest(cfg, [], time.perf_counter(), read, 3, 0, 0, 100, "uint16", "{}", (4, 2))

    counts = {s["step"]: s["counts"] for s in m["steps"]}
    # "unusually" in each PROSE, "ann@example.org." (length runs before pii); "short" has none
    assert counts["length"] == {"long_words": 4}
    assert counts["normalize"] == {"changed": 1}  # only the CRLF one changed
    assert counts["pii"]["pii_email"] == 1 and counts["read"] == {}
    assert m["pii_redactions_by_kind"] == {"email": 1, "ipv4": 0, "ipv6": 0, "phone": 0}
    assert m["pii_redactions"] == 1
