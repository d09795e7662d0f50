"""SFT data: loss masks that cover exactly what is trained on, bad lines reported, packing that
keeps every example intact, and a Ray Data path that writes the same bytes as the local one."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge import ConfigError, LmforgeError
from lmforge.data.tokenizer import train_bpe
from lmforge.finetune import conversation as C
from lmforge.finetune import data as D
from lmforge.finetune.packing import PACK_WINDOW, Example, RowPacker
from lmforge.model import chat
from lmforge.model.special import SpecialTokens

PAD, EOS_ID = 0, 2

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does os.getcwd do?"},
    {"role": "assistant", "content": "Return the current working directory."},
    {"role": "user", "content": "And os.sep?"},
    {"role": "assistant", "content": "The character used to separate path components."},
]
ANSWERS = [CONVERSATION[2]["content"], CONVERSATION[4]["content"]]

# Another common format (ChatML-like, markers as plain text here): the masks must follow it.
CHATML = (
    "{% for m in messages %}{{ '[start]' + m['role'] + '\\n' + m['content'] + '[stop]\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[start]assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for m in CONVERSATION] * 5 + [
        "Return the sum of a and b.",
        "Split the pathname into a pair.",
        "The character used to separate path components.",
    ] * 5
    return train_bpe(texts, vocab_size=300, min_frequency=0)


def masked_runs(tok, ids, mask) -> list[str]:
    """The decoded text of each contiguous run of mask=1 tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_loss_mask_covers_exactly_the_assistant_turns(tok):
    ids, mask = C.encode_conversation(tok, CONVERSATION, "assistant")
    text = "<|eos|>" + chat.render(CONVERSATION) + "<|eos|>"
    assert tok.decode(ids, skip_special_tokens=False) == text
    rendered = tok.encode(chat.render(CONVERSATION), add_special_tokens=False).ids
    assert ids == [EOS_ID] + rendered + [EOS_ID] and mask[0] == 0
    # the template's "\n" after each <|end|> is formatting, not the assistant's: unmasked
    assert masked_runs(tok, ids, mask) == [
        ANSWERS[0] + "<|end|>",
        ANSWERS[1] + "<|end|>",
        "<|eos|>",
    ]
    assert ids[-2:] == [tok.token_to_id("\n") or ids[-2], EOS_ID] and mask[-2:] == [0, 1]
    # the role header stays unmasked
    assistant = tok.token_to_id("<|assistant|>")
    assert all(m == 0 for i, m in zip(ids, mask, strict=True) if i == assistant)


def test_last_turn_and_all(tok):
    ids, mask = C.encode_conversation(tok, CONVERSATION, "last_turn")
    assert masked_runs(tok, ids, mask) == [ANSWERS[1] + "<|end|>", "<|eos|>"]
    ids, mask = C.encode_conversation(tok, CONVERSATION, "all")
    assert mask == [0] + [1] * (len(ids) - 1)  # all but the leading <|eos|>: nothing predicts it
    # no <|eos|> after a conversation that ends with a user turn
    ids, mask = C.encode_conversation(tok, CONVERSATION[:4], "assistant")
    assert ids[-1] != EOS_ID and masked_runs(tok, ids, mask) == [ANSWERS[0] + "<|end|>"]


def test_a_jinja_chat_template_is_followed(tok):
    # the built-in format as a template gives exactly the built-in encoding
    builtin = C.encode_conversation(tok, CONVERSATION, "assistant")
    as_template = SpecialTokens(chat_template=chat.CHAT_TEMPLATE)
    assert C.encode_conversation(tok, CONVERSATION, "assistant", as_template) == builtin
    ids, mask = C.encode_conversation(
        tok, CONVERSATION, "assistant", SpecialTokens(chat_template=CHATML)
    )
    assert tok.decode(ids, skip_special_tokens=False).startswith(
        "<|eos|>[start]system\nBe brief.[stop]"
    )
    assert masked_runs(tok, ids, mask) == [ANSWERS[0] + "[stop]", ANSWERS[1] + "[stop]", "<|eos|>"]
    # a template whose earlier turns change with later ones cannot be masked: a clear error
    unstable = "{{ messages | length }}" + CHATML
    with pytest.raises(LmforgeError, match=r"does not extend messages\[:2\]"):
        C.encode_conversation(tok, CONVERSATION, "assistant", SpecialTokens(chat_template=unstable))


def test_prompt_completion_lines_and_bad_lines():
    assert C.parse_example({"prompt": "Q?", "completion": "A."}) == [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    for obj, why in [
        ([1], "expected a JSON object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\]: role must be"),
        ({"messages": [{"role": "user", "content": 3}]}, "'content' must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"prompt": "Q?"}, "expected {'messages'"),
    ]:
        with pytest.raises(ValueError, match=why):
            C.parse_example(obj)


def write_jsonl(path, lines) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def good_lines(n: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 2:
            out.append({"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."})
        else:
            out.append({"messages": CONVERSATION[1:3]})
    return out


def test_bad_lines_are_reported_and_skipped(tmp_path, tok, capsys):
    lines = good_lines(6)
    lines[2] = "{not json"
    lines[4] = {"messages": [{"role": "user", "content": "hi"}]}
    src = write_jsonl(tmp_path / "chat.jsonl", lines + [""])  # a blank line is not an example
    cfg = D.SftDataConfig(sources=[src], val_fraction=0.0)
    m = D.prepare_sft(cfg, tok.to_str(), str(tmp_path / "out"), seq_len=64, use_ray=False)
    assert m["skipped"] == 2 and m["examples_train"] == 4 and m["examples_val"] == 0
    assert m["problems"][0].startswith(f"{src}:3: not valid JSON")
    assert m["problems"][1] == f"{src}:5: no assistant turn: nothing to train on"
    err = capsys.readouterr().err
    assert f"{src}:3: not valid JSON" in err and f"{src}:5: no assistant turn" in err
    assert not (tmp_path / "out" / "val").exists()


def test_no_valid_line_is_an_error_naming_the_file(tmp_path, tok):
    good = write_jsonl(tmp_path / "good.jsonl", good_lines(3))
    bad = write_jsonl(tmp_path / "bad.jsonl", ["[1, 2]", {"prompt": "only a prompt"}])
    cfg = D.SftDataConfig(sources=[good, bad])
    with pytest.raises(
        LmforgeError,
        match=rf"{bad}: no valid SFT example \(2 lines; first problem: {bad}:1: expected a JSON object",
    ):
        D.prepare_sft(cfg, tok.to_str(), str(tmp_path / "out"), seq_len=64, use_ray=False)
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: no such file"):
        D.prepare_sft(
            D.SftDataConfig(sources=[str(tmp_path / "missing.jsonl")]),
            tok.to_str(),
            str(tmp_path / "out"),
            seq_len=64,
            use_ray=False,
        )
    with pytest.raises(ConfigError, match="unknown built-in SFT data 'builtin:nope'"):
        D.plan_inputs(D.SftDataConfig(sources=["builtin:nope"]))
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def read_rows(directory) -> dict[str, np.ndarray]:
    tables = [pq.read_table(p) for p in sorted(directory.glob("part-*.parquet"))]
    return {
        c: np.concatenate([t.column(c).combine_chunks().flatten().to_numpy() for t in tables])
        for c in ("tokens", "loss_mask", "segments")
    }


def check_rows(rows: dict[str, np.ndarray], block: int, examples: list[tuple[list, list]]):
    """Every example exactly once, intact, with its mask (first token 0) and a segment id."""
    tokens, loss, segs = (rows[c].reshape(-1, block) for c in ("tokens", "loss_mask", "segments"))
    found = []
    for r in range(len(tokens)):
        assert (tokens[r][segs[r] == 0] == PAD).all() and (loss[r][segs[r] == 0] == 0).all()
        k = segs[r].max()
        assert k >= 1 and sorted(set(segs[r][segs[r] > 0])) == list(range(1, k + 1))
        for s in range(1, k + 1):
            at = np.flatnonzero(segs[r] == s)
            assert (np.diff(at) == 1).all()  # one contiguous run per example
            found.append((tuple(tokens[r][at]), tuple(loss[r][at])))
    expected = [(tuple(ids), (0, *mask[1:])) for ids, mask in examples]
    assert sorted(found) == sorted(expected)


def pack_examples(
    examples: list[Example], seq_len: int, packing: bool, pad_id: int = 0
) -> pa.Table:
    """All rows of some (ids, mask) examples in one table (what prepare_sft writes, in memory)."""
    packer = RowPacker(seq_len + 1, packing, pad_id, rows_per_table=1 << 30)
    tables = [t for ex in examples for t in packer.add(*ex)] + list(packer.finish())
    return pa.concat_tables(tables)


def first_fit(lengths: list[int], block: int, window: int) -> list[list[int]]:
    """The reference: each row's example indices, first-fit over the last `window` open rows,
    rows in the order they close (the oldest closes when a new row would exceed the window)."""
    open_rows: list[list] = []  # [free, [indices]]
    closed = []
    for i, n in enumerate(lengths):
        row = next((r for r in open_rows if r[0] >= n), None)
        if row is None:
            if len(open_rows) == window:
                closed.append(open_rows.pop(0)[1])
            open_rows.append([block - n, [i]])
        else:
            row[0] -= n
            row[1].append(i)
    return closed + [r[1] for r in open_rows]


def test_first_fit_window_packs_in_a_fixed_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 130, size=400).tolist()
    examples = [([1000 + i] * n, [1] * n) for i, n in enumerate(lengths)]
    table = pack_examples(examples, seq_len=128, packing=True)
    tokens = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, 129)
    segs = table.column("segments").combine_chunks().flatten().to_numpy().reshape(-1, 129)
    rows = [
        [int(t[s == k][0]) - 1000 for k in range(1, s.max() + 1)]
        for t, s in zip(tokens, segs, strict=True)
    ]
    expected = first_fit(lengths, 129, PACK_WINDOW)
    assert len(expected) > PACK_WINDOW  # the window mattered
    assert rows == expected
    assert len(expected) < len(first_fit(lengths, 129, 1))  # better than one open row


def test_packing_keeps_every_example_once(tok):
    examples = [
        C.encode_conversation(tok, CONVERSATION[: 3 + 2 * (i % 2)], "assistant") for i in range(25)
    ]
    examples += [([7] * 10, [1] * 10), ([8] * 129, [0] + [1] * 128)]  # exactly one full row
    for packing in (True, False):
        table = pack_examples(examples, seq_len=128, packing=packing, pad_id=PAD)
        rows = {
            c: table.column(c).combine_chunks().flatten().to_numpy() for c in table.column_names
        }
        check_rows(rows, 129, examples)
        assert table.schema.field("tokens").type.list_size == 129
        assert str(table.schema.field("loss_mask").type.value_type) == "int8"
        rows = len(first_fit([len(e[0]) for e in examples], 129, PACK_WINDOW))
        assert len(table) == (rows if packing else len(examples)) and rows < len(examples)
    with pytest.raises(ValueError, match="130 tokens does not fit in a row of 129"):
        pack_examples([([1] * 130, [1] * 130)], seq_len=128, packing=True)


@pytest.mark.slow
def test_prepare_sft_builtin_packing_is_efficient_and_deterministic(tmp_path, tok):
    def run(name: str, packing: bool):
        cfg = D.SftDataConfig(packing=packing, max_examples=300)
        return D.prepare_sft(cfg, tok.to_str(), str(tmp_path / name), seq_len=256, use_ray=False)

    a, b, c = run("a", True), run("b", True), run("c", False)
    for split in ("train", "val"):
        assert a[f"examples_{split}"] == c[f"examples_{split}"] == 300
        assert a[f"tokens_{split}"] == c[f"tokens_{split}"]
        assert a[f"loss_tokens_{split}"] == c[f"loss_tokens_{split}"]
        assert a[f"rows_{split}"] < c[f"rows_{split}"] == 300
        efficiency, unpacked = a[f"packing_efficiency_{split}"], c[f"packing_efficiency_{split}"]
        assert efficiency > 0.85 and efficiency > 1.5 * unpacked
        assert (tmp_path / "a" / split / "part-00000.parquet").read_bytes() == (
            tmp_path / "b" / split / "part-00000.parquet"
        ).read_bytes()
        rows = read_rows(tmp_path / "a" / split)
        assert int((rows["segments"] > 0).sum()) == a[f"tokens_{split}"]
        assert int(rows["loss_mask"].sum()) == a[f"loss_tokens_{split}"]
    assert a == b and a["kind"] == "sft" and a["vocab_size"] == tok.get_vocab_size()
    assert (tmp_path / "a" / "_SUCCESS").exists()
    assert (tmp_path / "a" / "tokenizer.json").read_text() == tok.to_str()


def test_too_long_examples_are_dropped_or_truncated(tmp_path, tok):
    long = {"prompt": "Hi", "completion": "Return the current working directory. " * 40}
    src = write_jsonl(tmp_path / "chat.jsonl", [long, *good_lines(3)])
    for mode, dropped, truncated, examples in (("drop", 1, 0, 3), ("truncate", 0, 1, 4)):
        cfg = D.SftDataConfig(sources=[src], val_fraction=0.0, truncate=mode, packing=False)
        m = D.prepare_sft(cfg, tok.to_str(), str(tmp_path / mode), seq_len=64, use_ray=False)
        assert (m["dropped_too_long"], m["truncated"], m["examples_train"]) == (
            dropped,
            truncated,
            examples,
        )
    rows = read_rows(tmp_path / "truncate" / "train")
    full = (rows["segments"].reshape(-1, 65) > 0).all(axis=1)
    assert full.tolist() == [True, False, False, False]  # the cut one (line 1) fills its row
    cut = rows["tokens"].reshape(-1, 65)[0]
    assert tok.decode(cut.tolist(), skip_special_tokens=False).startswith(
        "<|eos|><|user|>\nHi<|end|>"
    )


def test_val_split_by_fraction_or_by_val_sources(tmp_path, tok):
    src = write_jsonl(tmp_path / "chat.jsonl", good_lines(40))
    cfg = D.SftDataConfig(sources=[src], val_fraction=0.3, seed=1)
    m = D.prepare_sft(cfg, tok.to_str(), str(tmp_path / "a"), seq_len=64, use_ray=False)
    assert m["examples_train"] + m["examples_val"] == 40
    assert 4 <= m["examples_val"] <= 20
    expected_val = sum(D.is_val(f"{src}:{n}", 1, 0.3) for n in range(1, 41))
    assert m["examples_val"] == expected_val
    val = write_jsonl(tmp_path / "val.jsonl", good_lines(5))
    cfg = D.SftDataConfig(sources=[src, "builtin:stdlib-sft"], val_sources=[val], max_examples=50)
    m = D.prepare_sft(cfg, tok.to_str(), str(tmp_path / "b"), seq_len=64, use_ray=False)
    assert m["examples_val"] == 5 and m["examples_train"] == 50


def test_val_target_bytes_give_the_val_loss_in_bits_per_byte(tmp_path, tok):
    """The manifest counts the UTF-8 bytes of the val split's target tokens (the answers; the
    end-of-turn tokens count none), so the trainer reports a fine-tune's val_bpb."""
    from lmforge.train.data import tokens_per_byte

    src = write_jsonl(tmp_path / "chat.jsonl", good_lines(20))
    val_lines = good_lines(5)
    val = write_jsonl(tmp_path / "val.jsonl", val_lines)
    cfg = D.SftDataConfig(sources=[src], val_sources=[val])
    m = D.prepare_sft(cfg, tok.to_str(), str(tmp_path / "sft"), seq_len=64, use_ray=False)
    answers = [line.get("completion") or line["messages"][-1]["content"] for line in val_lines]
    assert m["loss_bytes_val"] == sum(len(a.encode()) for a in answers)
    per_byte = tokens_per_byte(m, "val", m["rows_val"], 65)
    assert per_byte == m["loss_tokens_val"] / m["loss_bytes_val"]
    assert tokens_per_byte({**m, "loss_bytes_val": 0}, "val", 1, 65) is None


@pytest.mark.ray
def test_prepare_sft_on_ray_data_writes_the_same_dataset(tmp_path, tok, ray_local):
    lines = good_lines(30)
    lines[7] = "not json"
    src = write_jsonl(tmp_path / "chat.jsonl", lines)
    cfg = D.SftDataConfig(sources=[src], val_fraction=0.2, seed=3)
    m = D.prepare_sft(cfg, tok.to_str(), str(tmp_path / "ray"), seq_len=64)
    local = D.prepare_sft(cfg, tok.to_str(), str(tmp_path / "local"), seq_len=64, use_ray=False)
    assert m == local
    assert m["skipped"] == 1 and m["problems"] == [
        f"{src}:8: not valid JSON (Expecting value: line 1 column 1 (char 0))"
    ]
    assert m["examples_train"] + m["examples_val"] == 29 and m["examples_val"] > 0
    for name in ("tokenizer.json", "manifest.json", "_SUCCESS"):
        assert (tmp_path / "ray" / name).exists()
    for split in ("train", "val"):
        files = sorted(p.name for p in (tmp_path / "ray" / split).iterdir())
        assert files == ["part-00000.parquet"]
        assert (tmp_path / "ray" / split / files[0]).read_bytes() == (
            tmp_path / "local" / split / files[0]
        ).read_bytes()
        rows = read_rows(tmp_path / "ray" / split)
        assert len(rows["tokens"]) == m[f"rows_{split}"] * 65
