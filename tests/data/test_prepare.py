"""The data stage end to end on Ray: accounting, poisoned input, dedup, determinism, reruns."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lmforge.config import config_yaml, load_config
from lmforge.data.config import DataConfig
from lmforge.stage import get_stage, run_stage
from tests.conftest import REPO

from .corpus import planted_corpus, write_jsonl, write_poisoned

pytestmark = pytest.mark.ray

PII_DOCS = [
    "Please write to alice.smith@example.com or call +1 (555) 123-4567 about the meeting today.",
    "The old server at 10.1.2.3 was replaced and its admin bob@example.org retired last year.",
]


def make_corpus(root: Path) -> dict:
    texts, origin = planted_corpus(n_unique=150, n_exact=10, n_near=20, seed=11)
    (root / "web").mkdir(parents=True)
    write_jsonl(root / "web" / "docs.jsonl", texts)
    expected = write_poisoned(root / "web" / "poison.jsonl", random.Random(2))
    (root / "pii.txt").write_text("\n".join(PII_DOCS) + "\n")
    return {"origin": origin, "poison": expected, "n_texts": len(texts)}


def config(root: Path, runs: Path) -> DataConfig:
    cfg_file = root / "data.yaml"
    cfg_file.write_text(
        f"""
name: e2e
runs_dir: {runs}
sources:
  - path: {root / "web"}
  - path: {root / "pii.txt"}
    txt_mode: line
steps:
  - step: normalize
  - step: length
    min_chars: 20
    min_words: 5
  - step: pii
tokenizer:
  vocab_size: 400
seq_len: 64
val_fraction: 0.1
shard_size_mb: 0.02
"""
    )
    return load_config(DataConfig, str(cfg_file))


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus = make_corpus(root)
    cfg = config(root, root / "runs")
    result = run_stage(get_stage("data"), cfg, quiet=True)
    return corpus, cfg, result, Path(result.output)


def test_accounting_and_exact_reject_counts(prepared):
    corpus, _, _, out = prepared
    m = json.loads((out / "manifest.json").read_text())
    assert (
        m["documents_in"]
        == m["documents_out"]
        + sum(m["rejected"].values())
        + m["duplicates_exact"]
        + m["duplicates_near"]
    )
    poison = corpus["poison"]
    assert m["rejected"] == {reason: len(lines) for reason, lines in poison["rejects"].items()}
    assert m["documents_in"] == corpus["n_texts"] + len(poison["valid"]) + 7 + len(PII_DOCS)
    assert m["duplicates_exact"] == 10
    assert m["duplicates_near"] == 20
    assert m["documents_out"] == 150 + len(poison["valid"]) + len(PII_DOCS)
    assert m["pii_redactions_by_kind"] == {"email": 2, "ipv4": 1, "ipv6": 0, "phone": 1}
    steps = {s["step"]: s for s in m["steps"]}
    assert steps["pii"]["counts"] == {"pii_email": 2, "pii_ipv4": 1, "pii_ipv6": 0, "pii_phone": 1}
    assert steps["normalize"]["counts"] == {"changed": 0}  # the corpus is normalized already
    assert steps["read"]["docs_out"] == steps["normalize"]["docs_in"]
    assert steps["dedup_near"]["docs_out"] == m["documents_out"]
    # the funnel figure of these counts is in the run folder
    from lmforge.plots import funnel_steps

    assert funnel_steps(m)[-2:] == [
        ("dedup_near", m["documents_out"]),
        ("packed", m["documents_out"]),
    ]
    assert (out / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rejects_name_reason_path_and_line(prepared):
    corpus, _, _, out = prepared
    rows = [json.loads(line) for f in sorted((out / "rejects").glob("*.json")) for line in f.open()]
    poison = {(r["reason"], r["line"]) for r in rows if r["path"] == "poison.jsonl"}
    expected = {
        (reason, line) for reason, lines in corpus["poison"]["rejects"].items() for line in lines
    }
    assert poison == expected
    dups = [r for r in rows if r["reason"] in ("duplicate_exact", "duplicate_near")]
    assert len(dups) == 30 and all(r["duplicate_of"] for r in dups)
    # every planted copy is what was dropped (its original, with a smaller line, may survive
    # instead when the copy has the smaller id; either way, one per cluster survives)
    assert all(r["path"] == "docs.jsonl" for r in dups)


def test_shards_follow_the_data_contract(prepared):
    _, cfg, _, out = prepared
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["shards"]["train"]) > 1 and m["shards"]["val"]
    blocks = tokens = 0
    for name in m["shards"]["train"]:
        table = pq.read_table(out / name)
        assert str(table.schema.field("tokens").type) == "fixed_size_list<element: uint16>[65]"
        blocks += table.num_rows
        tokens += table.num_rows * (cfg.seq_len + 1)
    assert (blocks, tokens) == (m["blocks_train"], m["tokens_train"])
    assert m["token_dtype"] == "uint16" and m["special_tokens"]["<|eos|>"] == 2
    assert 0 < m["bytes_val"] < m["bytes_train"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    shard = pq.read_table(out / m["shards"]["train"][0])["tokens"].to_pylist()
    assert any(2 in block for block in shard)  # documents joined by EOS
    assert "<EMAIL>" in "".join(
        tok.decode(b)
        for name in m["shards"]["train"] + m["shards"]["val"]
        for b in pq.read_table(out / name)["tokens"].to_pylist()
    )
    assert m["tokenizer_sha256"] and (out / "_SUCCESS").exists()


def test_rerun_of_a_complete_output_is_a_noop(prepared):
    _, cfg, _, out = prepared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run_stage(get_stage("data"), cfg, quiet=True).status == "skipped"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_cli_errors_are_one_line_before_work(cli, ray_local, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"runs_dir: {tmp_path}\nsources:\n  - path: {tmp_path / 'nope.jsonl'}\n")
    code, out, err = cli("data", "prepare", "-c", cfg)
    assert code == 2
    assert err.strip().count("\n") == 0 and "no such file or directory" in err
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").glob("*/manifest.json"))
    with pytest.raises(SystemExit) as exit_:
        cli("data", "prepare", "--help")
    assert exit_.value.code == 0


@pytest.mark.parametrize(
    "texts, line",
    [
        (
            ["too short", "also short"],
            "no documents left after the filters: 2 read, 2 rejected (too_few_words 2); see ",
        ),
        ([], "no documents read from the sources: check data.sources"),
    ],
)
def test_a_corpus_with_nothing_left_is_one_line_and_keeps_its_rejects(
    cli, ray_local, tmp_path, texts, line
):
    """An empty corpus, or one the filters reject whole, used to end in an Arrow traceback
    from the dedup shuffle (exit 1); the rejects say why, so they are written first."""
    write_jsonl(tmp_path / "docs.jsonl", texts)
    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        f"runs_dir: {tmp_path / 'runs'}\nsources: [{{path: {tmp_path / 'docs.jsonl'}}}]\n"
        "steps: [{step: length, min_chars: 1, min_words: 5}]\n"
    )
    code, _, err = cli("data", "prepare", "-c", cfg)
    assert code == 2
    # one line of ours, last (Ray Data's own progress logs may precede it)
    errors = [ln for ln in err.splitlines() if ln.startswith("lmforge: error:")]
    assert len(errors) == 1 and line in errors[0] and err.strip().endswith(errors[0]), err[-2000:]
    assert "ArrowInvalid" not in err and "Invalid sort key" not in err  # the old dedup failure
    (out,) = (tmp_path / "runs" / "data").iterdir()
    assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
    rejects = [json.loads(ln) for f in (out / "rejects").glob("*.json") for ln in f.open()]
    assert sorted(r["reason"] for r in rejects) == ["too_few_words"] * len(texts)
    if texts:
        assert errors[0].endswith(f"see {out / 'rejects'}")


@pytest.mark.slow
def test_two_node_cluster_gives_the_same_shards(prepared, tmp_path):
    """The same config on a 2-node ray.cluster_utils.Cluster (in a subprocess, since this
    process already has a Ray) writes byte-identical shards."""
    corpus, cfg, result, out = prepared
    runs2 = tmp_path / "runs"
    script = f"""
import sys
from lmforge.cluster.local import ensure_token
ensure_token()
import ray
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
assert len([n for n in ray.nodes() if n["Alive"]]) == 2
from lmforge.config import config_yaml, load_config
from lmforge.data.config import DataConfig
from lmforge.stage import get_stage, run_stage
cfg = DataConfig.model_validate_json({cfg.model_copy(update={"runs_dir": str(runs2)}).model_dump_json()!r})
print(run_stage(get_stage("data"), cfg, quiet=True).output)
ray.shutdown()
cluster.shutdown()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = Path(proc.stdout.strip().splitlines()[-1])
    assert other.name == out.name
    for split in ("train", "val"):
        names = sorted(p.name for p in (out / split).iterdir())
        assert names == sorted(p.name for p in (other / split).iterdir())
        for name in names:
            assert (other / split / name).read_bytes() == (out / split / name).read_bytes()


def test_run_killed_while_packing_reruns_to_identical_shards(prepared, tmp_path):
    """SIGKILL a real `jobs/prepare_data.py` (and its embedded Ray) once packing starts; no
    file under a final shard name is partial, and the rerun writes the same bytes."""
    _, cfg, _, out = prepared
    killed = cfg.model_copy(update={"runs_dir": str(tmp_path / "runs")})
    cfg_file = tmp_path / "data.yaml"
    cfg_file.write_text(config_yaml(killed))
    target = tmp_path / "runs" / out.relative_to(cfg.runs_dir)
    proc = subprocess.Popen(
        [sys.executable, "jobs/prepare_data.py", "-c", str(cfg_file)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 200
    while not (target / "tokenizer.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never reached packing"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (target / "_SUCCESS").exists() and not (target / "manifest.json").exists()
    for split in ("train", "val"):
        for f in (target / split).glob("part-*.parquet") if (target / split).exists() else []:
            assert pq.read_table(f).num_rows > 0  # complete, or not there at all
    again = run_stage(get_stage("data"), killed, quiet=True)
    assert again.status == "ran" and Path(again.output) == target
    assert not list(target.rglob(".tmp-*"))
    for split in ("train", "val"):
        names = sorted(p.name for p in (out / split).iterdir())
        assert names == sorted(p.name for p in (target / split).iterdir())
        for name in names:
            assert (target / split / name).read_bytes() == (out / split / name).read_bytes()
    assert (target / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (out, target))
    for m in (m1, m2):
        for k in ("seconds", "tokens_per_second", "documents_per_second", "phase_seconds"):
            m.pop(k)
    assert m1 == m2
