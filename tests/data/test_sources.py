"""Reading sources: every format, record-level rejects with line numbers, errors up front."""

from __future__ import annotations

import gzip
import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge import LmforgeError
from lmforge.builtin import corpus as builtin
from lmforge.data.config import SourceConfig
from lmforge.data.readers import doc_id, read_file
from lmforge.data.sources import resolve_sources

from .corpus import write_poisoned

LIMIT = 8 * 2**20


def read_all(src: SourceConfig) -> pa.Table:
    items = [item for files in resolve_sources([src]) for item in files]
    return pa.concat_tables(t for item in items for t in read_file(src, item, LIMIT, 4))


def test_poisoned_jsonl_exact_counts_and_no_valid_doc_lost(tmp_path):
    expected = write_poisoned(tmp_path / "poison.jsonl", random.Random(1))
    table = read_all(SourceConfig(path=str(tmp_path / "poison.jsonl")))
    kept = table.filter(pa.compute.equal(table["reject"], ""))
    assert kept["text"].to_pylist() == expected["valid"]
    rejected = table.filter(pa.compute.not_equal(table["reject"], "")).to_pylist()
    got: dict[str, list[int]] = {}
    for row in rejected:
        got.setdefault(row["reject"], []).append(row["line"])
        assert row["step"] == "read" and len(row["text"]) <= 200  # a snippet, not the 20 MB
    assert got == expected["rejects"]
    # line numbers: the valid document after the bad UTF-8 line is line 5
    assert kept.to_pylist()[2]["line"] == 5


def test_ids_are_stable_and_distinct(tmp_path):
    (tmp_path / "a.txt").write_text("one line\nanother line\n")
    src = SourceConfig(path=str(tmp_path), txt_mode="line", name="mine")
    first = read_all(src)["id"].to_pylist()
    assert first == read_all(src)["id"].to_pylist()
    assert first == [doc_id("mine", "a.txt", 1), doc_id("mine", "a.txt", 2)]
    assert len(set(first)) == 2


def test_txt_modes_and_gzip(tmp_path):
    text = "para one line a\npara one line b\n\n\npara two\n"
    (tmp_path / "doc.txt").write_text(text)
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write('{"content": "zipped doc"}\n')
    whole = read_all(SourceConfig(path=str(tmp_path / "doc.txt")))
    assert whole["text"].to_pylist() == [text] and whole["line"].to_pylist() == [1]
    paras = read_all(SourceConfig(path=str(tmp_path / "doc.txt"), txt_mode="paragraph"))
    assert paras["text"].to_pylist() == ["para one line a\npara one line b", "para two"]
    assert paras["line"].to_pylist() == [1, 5]
    lines = read_all(SourceConfig(path=str(tmp_path / "doc.txt"), txt_mode="line"))
    assert lines["line"].to_pylist() == [1, 2, 5]
    zipped = read_all(SourceConfig(path=str(tmp_path / "*.gz"), text_field="content"))
    assert zipped["text"].to_pylist() == ["zipped doc"]


def test_parquet_csv_and_json_array(tmp_path):
    pq.write_table(
        pa.table({"text": ["a doc", None, "b doc"], "n": [1, 2, 3]}), tmp_path / "t.parquet"
    )
    (tmp_path / "t.csv").write_text('id,text\n1,"first, with comma"\n2,second\n')
    (tmp_path / "t.json").write_text('[{"text": "in array"}, {"text": 5}]')
    pqt = read_all(SourceConfig(path=str(tmp_path / "t.parquet")))
    assert pqt["reject"].to_pylist() == ["", "missing_field", ""]
    assert pqt["line"].to_pylist() == [1, 2, 3]
    csvt = read_all(SourceConfig(path=str(tmp_path / "t.csv")))
    assert csvt["text"].to_pylist() == ["first, with comma", "second"]
    js = read_all(SourceConfig(path=str(tmp_path / "t.json")))
    assert js["reject"].to_pylist() == ["", "non_string_field"]
    numbers = read_all(SourceConfig(path=str(tmp_path / "t.parquet"), text_field="n"))
    assert set(numbers["reject"].to_pylist()) == {"non_string_field"}


def test_weight_downsamples_deterministically(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i}\n" for i in range(400)))
    half = read_all(SourceConfig(path=str(tmp_path), txt_mode="line", weight=0.5))
    sampled = half["reject"].to_pylist().count("sampled_out")
    assert 140 < sampled < 260
    assert (
        half["reject"].to_pylist()
        == read_all(SourceConfig(path=str(tmp_path), txt_mode="line", weight=0.5))[
            "reject"
        ].to_pylist()
    )
    double = read_all(SourceConfig(path=str(tmp_path), txt_mode="line", weight=2))
    assert set(double["copies"].to_pylist()) == {2}


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(LmforgeError, match="no such file"):
        resolve_sources([SourceConfig(path=str(tmp_path / "missing.jsonl"))])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(LmforgeError, match="no readable input files"):
        resolve_sources([SourceConfig(path=str(tmp_path))])
    with pytest.raises(LmforgeError, match="builtin:python-docs"):
        resolve_sources([SourceConfig(path="builtin:nope")])


def test_builtin_python_docs():
    files = builtin.python_docs_files()
    assert builtin.TOPICS in files and "json/__init__.py" in files
    docs = dict(builtin.python_docs_records("json/__init__.py"))
    assert docs[1].startswith("Module json\n\nJSON (JavaScript Object Notation)")
    assert any(t.startswith("json.dumps(") for t in docs.values())
    topics = list(builtin.python_docs_records(builtin.TOPICS))
    assert len(topics) > 50 and any(t.startswith("if\n\n") for _, t in topics)


def test_hugging_face_save_to_disk_folder(tmp_path):
    """A `save_to_disk` folder: Arrow IPC stream files plus JSON metadata that is not data."""
    folder = tmp_path / "hf"
    folder.mkdir()
    table = pa.table({"text": ["first doc", None, "third doc"], "label": [0, 1, 2]})
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table, max_chunksize=2)
    (folder / "state.json").write_text(
        '{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}'
    )
    (folder / "dataset_info.json").write_text("{}")
    rows = read_all(SourceConfig(path=str(folder))).to_pylist()
    assert [(r["path"], r["line"], r["text"], r["reject"]) for r in rows] == [
        ("data-00000-of-00001.arrow", 1, "first doc", ""),
        ("data-00000-of-00001.arrow", 2, "", "missing_field"),
        ("data-00000-of-00001.arrow", 3, "third doc", ""),
    ]
    # the random-access Arrow file format reads the same
    with (
        pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    assert (
        read_all(SourceConfig(path=str(tmp_path / "t.arrow")))["text"].to_pylist()[0] == "first doc"
    )


def test_hub_dataset_is_read_from_its_cache_files(tmp_path, monkeypatch):
    """`hf:NAME` asks `datasets.load_dataset` (a stand-in here: no hub from this machine) and
    reads the cache files it returns as Arrow, with ids that name the dataset and split."""
    import sys
    import types

    cache = tmp_path / "cache" / "wikitext-train.arrow"
    cache.parent.mkdir()
    table = pa.table({"text": ["a first article", "a second article"]})
    with pa.OSFile(str(cache), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    calls = []

    def load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split))
        if name != "wikitext":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        return types.SimpleNamespace(cache_files=[{"filename": str(cache)}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the commit lookup: offline
    src = SourceConfig(path="hf:wikitext", hf_config="wikitext-2-raw-v1", hf_split="validation")
    rows = read_all(src).to_pylist()
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation")]
    assert [(r["path"], r["line"], r["text"]) for r in rows] == [
        ("wikitext/validation/wikitext-train.arrow", 1, "a first article"),
        ("wikitext/validation/wikitext-train.arrow", 2, "a second article"),
    ]
    with pytest.raises(LmforgeError, match=r"cannot load dataset 'nope'.*doesn't exist on the Hub"):
        resolve_sources([SourceConfig(path="hf:nope")])
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(
        LmforgeError, match=r"need the `datasets` package: pip install 'lmforge\[hf\]'"
    ):
        resolve_sources([src])


ARTICLE = (
    "<html><head><title>News</title></head><body><nav>Home | About | Contact</nav>"
    "<article><h1>River levels rise</h1><p>"
    + "The river rose by two metres overnight after three days of heavy rain in the hills. " * 4
    + "</p></article><footer>Copyright 2024 Example News</footer></body></html>"
)


def test_html_and_warc_main_text(tmp_path):
    pytest.importorskip("trafilatura")
    pytest.importorskip("warcio")
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    (tmp_path / "page.html").write_text(ARTICLE)
    page = read_all(SourceConfig(path=str(tmp_path / "page.html"))).to_pylist()[0]
    assert page["reject"] == "" and page["text"].startswith("River levels rise")
    assert "Copyright" not in page["text"] and "Contact" not in page["text"]

    def response(writer, url, ctype, body):
        headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
        return writer.create_warc_record(
            url, "response", payload=io.BytesIO(body), http_headers=headers
        )

    with open(tmp_path / "crawl.warc.gz", "wb") as f:
        writer = WARCWriter(f, gzip=True)
        writer.write_record(writer.create_warcinfo_record("crawl.warc.gz", {"software": "test"}))
        writer.write_record(
            response(writer, "http://a.example/", "text/html; charset=utf-8", ARTICLE.encode())
        )
        writer.write_record(response(writer, "http://b.example/x.png", "image/png", b"\x89PNG"))
        writer.write_record(
            response(
                writer,
                "http://c.example/",
                "text/html",
                b"<html><head><title>empty</title></head><body></body></html>",
            )
        )
    rows = read_all(SourceConfig(path=str(tmp_path / "crawl.warc.gz"))).to_pylist()
    assert [(r["line"], r["reject"]) for r in rows] == [(2, ""), (4, "no_main_text")]
    assert rows[0]["text"].startswith("River levels rise")


def test_a_whole_file_document_over_the_limit_is_a_snippet_rejected_not_read(tmp_path):
    (tmp_path / "big.txt").write_bytes(b"a" * 5000)
    (tmp_path / "big.html").write_bytes(b"<p>" + b"b" * 5000 + b"</p>")
    (tmp_path / "ok.txt").write_bytes(b"small")
    rows = []
    for name in ("big.txt", "big.html", "ok.txt"):
        src = SourceConfig(path=str(tmp_path / name))
        items = [item for files in resolve_sources([src]) for item in files]
        rows += [r for t in read_file(src, items[0], 1000, 4) for r in t.to_pylist()]
    assert [r["reject"] for r in rows] == ["record_too_large", "record_too_large", ""]
    assert [len(r["text"]) <= 200 for r in rows[:2]] == [True, True]
    assert rows[2]["text"] == "small" and rows[2]["line"] == 1
