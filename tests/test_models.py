"""Model versions and lineage (model/artifact.py) and `lmforge models list/show`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lmforge import LmforgeError
from lmforge.model import artifact as mv
from lmforge.model.artifact import write_serving_pointer
from lmforge.stage import read_serving_pointer


def save_tiny(directory: Path, seed: int = 0, **lineage) -> dict:
    import torch

    from lmforge.model.artifact import save_artifact
    from lmforge.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16
    )
    torch.manual_seed(seed)
    model = Llama(cfg)
    model.init_weights(seed)
    return save_artifact(str(directory), model.state_dict(), cfg, lineage=lineage or None)


def test_version_is_the_hash_of_the_weights(tmp_path):
    record = save_tiny(tmp_path / "a")
    digest = hashlib.sha256((tmp_path / "a" / "model.safetensors").read_bytes()).hexdigest()
    assert record["version"] == "v-" + digest[:12]
    assert json.loads((tmp_path / "a" / "version.json").read_text()) == record
    assert record["parent"] is None and record["created"].endswith("Z")
    # The same weights elsewhere: the same id; other weights: another id.
    assert save_tiny(tmp_path / "b")["version"] == record["version"]
    assert save_tiny(tmp_path / "c", seed=1)["version"] != record["version"]


def test_lineage_is_stored_and_read_back(tmp_path):
    parent = save_tiny(tmp_path / "parent")
    child = save_tiny(
        tmp_path / "child",
        seed=2,
        parent=parent["version"],
        parent_path=str(tmp_path / "parent"),
        data_manifest_hash="d" * 12,
        config_hash="c" * 12,
        stage="train",
        run="base-cccccccccccc",
        val_bpb=1.25,
    )
    got = mv.read_version(str(tmp_path / "child"))
    assert got == child
    assert got["parent"] == parent["version"] and got["val_bpb"] == 1.25
    assert set(mv.LINEAGE_FIELDS) | {"version"} <= set(got)


def test_artifact_without_version_json_gets_the_same_id(tmp_path):
    record = save_tiny(tmp_path / "a")
    (tmp_path / "a" / "version.json").unlink()
    got = mv.read_version(str(tmp_path / "a"))
    assert got["version"] == record["version"]
    assert got["parent"] is None and got["created"] is None and got["stage"] is None


def test_read_version_errors_are_one_clear_line(tmp_path):
    with pytest.raises(LmforgeError, match="not a model artifact"):
        mv.read_version(str(tmp_path))
    save_tiny(tmp_path / "a")
    (tmp_path / "a" / "version.json").write_text("{oops")
    with pytest.raises(LmforgeError, match="version.json: not valid JSON"):
        mv.read_version(str(tmp_path / "a"))


def test_serving_pointer_round_trip_keeps_the_previous_one(tmp_path):
    runs = str(tmp_path / "runs")
    assert read_serving_pointer(runs) is None
    a = save_tiny(tmp_path / "a")
    b = save_tiny(tmp_path / "b", seed=1)
    first = write_serving_pointer(runs, str(tmp_path / "a"), reason="first")
    assert first["version"] == a["version"] and first["reason"] == "first"
    assert "previous" not in first
    second = write_serving_pointer(runs, str(tmp_path / "b"))
    assert read_serving_pointer(runs) == second
    assert second["version"] == b["version"]
    assert second["previous"] == {"artifact": str(tmp_path / "a"), "version": a["version"]}
    with pytest.raises(LmforgeError, match="not a model artifact"):
        write_serving_pointer(runs, str(tmp_path / "nowhere"))


def test_serving_pointer_survives_another_directory_and_a_moved_runs_dir(tmp_path, monkeypatch):
    """current.json held the artifact as the promoting process's working directory saw it."""
    from lmforge.model.artifact import resolve_artifact

    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "runs" / "improve" / "loop-1" / "model")
    save_tiny(tmp_path / "runs" / "improve" / "loop-2" / "model", seed=1)
    write_serving_pointer("runs", "runs/improve/loop-1/model")
    write_serving_pointer("runs", "runs/improve/loop-2/model")
    stored = json.loads((tmp_path / "runs" / "serving" / "current.json").read_text())
    assert stored["artifact"] == "improve/loop-2/model"
    assert stored["previous"]["artifact"] == "improve/loop-1/model"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "runs").rename(tmp_path / "moved")
    served = resolve_artifact(f"{tmp_path / 'moved'}/@serving")
    assert served == str(tmp_path / "moved" / "improve" / "loop-2" / "model")
    pointer = read_serving_pointer(str(tmp_path / "moved"))
    assert pointer["previous"]["artifact"] == str(tmp_path / "moved/improve/loop-1/model")
    # a pointer written before (relative to the old working directory) still reads
    stored["artifact"] = "runs/improve/loop-1/model"
    (tmp_path / "moved" / "serving" / "current.json").write_text(json.dumps(stored))
    served = resolve_artifact(f"{tmp_path / 'moved'}/@serving")
    assert served == str(tmp_path / "moved" / "improve" / "loop-1" / "model")


# ---------------------------------------------------------------- lmforge models list / show


def complete(run_dir: Path, completed_at: str = "2026-01-01T00:00:00Z") -> None:
    (run_dir / "_SUCCESS").write_text(json.dumps({"completed_at": completed_at}))


@pytest.fixture
def runs(tmp_path) -> Path:
    """A runs dir: a base model, a fine-tune of it (eval'd), an improve-promoted one, an
    unfinished run (left out) and an old artifact without version.json (listed, id hashed)."""
    runs = tmp_path / "runs"
    base = runs / "train" / "base-aaaaaaaaaaaa"
    b = save_tiny(base / "model", data_manifest_hash="d1", config_hash="aaaaaaaaaaaa",
                  stage="train", run="base-aaaaaaaaaaaa", val_bpb=2.5)  # fmt: skip
    complete(base)
    (base / "model" / "version.json").write_text(
        json.dumps({**b, "created": "2026-01-01T00:00:00Z"})
    )
    sft = runs / "finetune" / "chat-bbbbbbbbbbbb"
    save_tiny(sft / "model", seed=1, parent=b["version"], parent_path=str(base / "model"),
              stage="finetune", run="chat-bbbbbbbbbbbb")  # fmt: skip
    complete(sft)
    ev = runs / "eval" / "chat-cccccccccccc"
    ev.mkdir(parents=True)
    # The eval ran in a pod: its report names the artifact where the pod mounts the runs dir.
    report = {"model": "/mnt/lmforge/runs/finetune/chat-bbbbbbbbbbbb/model", "tasks": {
        "val": {"loss": {"value": 1.0, "n": 4}, "bits_per_byte": {"value": 1.5, "n": 4}},
        "arc": {"acc": {"value": 0.25, "n": 8}, "acc_norm": {"value": 0.375, "n": 8}}}}  # fmt: skip
    (ev / "report.json").write_text(json.dumps(report))
    complete(ev)
    promoted = runs / "improve" / "2026-01-02" / "model"
    save_tiny(promoted, seed=2, stage="improve", run="2026-01-02", parent=b["version"])
    unfinished = runs / "train" / "broken-dddddddddddd"
    save_tiny(unfinished / "model", seed=3)
    (unfinished / "model" / "version.json").unlink()  # killed before version.json: not listed
    old = runs / "train" / "old-eeeeeeeeeeee"
    save_tiny(old / "model", seed=4)
    (old / "model" / "version.json").unlink()
    complete(old, "2025-12-31T00:00:00Z")
    return runs


def test_list_finds_every_complete_artifact_with_lineage_and_evals(runs):
    from lmforge.model.registry import list_models

    models = list_models(str(runs))
    by_run = {m["run"]: m for m in models}
    assert sorted(by_run) == ["2026-01-02", "base-aaaaaaaaaaaa", "chat-bbbbbbbbbbbb",
                              "old-eeeeeeeeeeee"]  # fmt: skip
    assert models[0]["run"] == "old-eeeeeeeeeeee"  # oldest first: created from its _SUCCESS
    old = by_run["old-eeeeeeeeeeee"]
    assert old["stage"] == "train" and old["created"] == "2025-12-31T00:00:00Z"
    weights = runs / "train" / "old-eeeeeeeeeeee" / "model" / "model.safetensors"
    assert old["version"] == "v-" + hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    base, chat = by_run["base-aaaaaaaaaaaa"], by_run["chat-bbbbbbbbbbbb"]
    assert chat["parent"] == base["version"] and chat["stage"] == "finetune"
    assert by_run["2026-01-02"]["stage"] == "improve"
    assert [e["summary"] for e in chat["evals"]] == ["val:bits_per_byte=1.5, arc:acc_norm=0.375"]
    assert base["evals"] == [] and not any(m["served"] for m in models)


def test_served_version_is_marked_and_shown(runs, cli):

    chat_dir = runs / "finetune" / "chat-bbbbbbbbbbbb" / "model"
    pointer = write_serving_pointer(str(runs), str(chat_dir))
    code, out, err = cli("models", "list", "--runs-dir", runs, "--json")
    assert code == 0, err
    served = [m for m in json.loads(out) if m["served"]]
    assert [m["version"] for m in served] == [pointer["version"]]
    code, out, _ = cli("models", "list", "--runs-dir", runs)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["version", "stage/run", "created"]
    assert len(lines) == 1 + 4 + 2  # header, 4 models, blank, legend
    (row,) = [line for line in lines[1:5] if line.startswith("*")]
    assert pointer["version"] in row and "finetune/chat-bbbbbbbbbbbb" in row
    assert "val:bits_per_byte=1.5" in row


def test_show_prints_the_lineage_up_to_the_root(runs, cli):
    from lmforge.model.registry import list_models

    by_run = {m["run"]: m for m in list_models(str(runs))}
    chat, base = by_run["chat-bbbbbbbbbbbb"], by_run["base-aaaaaaaaaaaa"]
    code, out, err = cli("models", "show", chat["version"][2:8], "--runs-dir", runs)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["version"] == chat["version"] and shown["copies"] == []
    assert [a["version"] for a in shown["ancestors"]] == [base["version"]]
    assert shown["ancestors"][0]["val_bpb"] == 2.5


def test_errors_are_one_line(tmp_path, cli):
    code, _, err = cli("models", "list", "--runs-dir", tmp_path / "nope")
    assert code != 0 and "runs dir" in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert cli("models", "list", "--runs-dir", tmp_path / "empty")[1].startswith("no model")
    code, _, err = cli("models", "show", "v-000000000000", "--runs-dir", tmp_path / "empty")
    assert code != 0 and "no model version" in err


def test_list_on_an_object_store(tmp_path):
    """The same listing on an object store (memory://, which behaves like S3)."""
    from lmforge import storage
    from lmforge.model.registry import list_models

    local = tmp_path / "model"
    record = save_tiny(local, stage="train", run="base-ffffffffffff")
    runs = "memory://models-test/runs"
    for f in local.iterdir():
        storage.write_bytes(f"{runs}/train/base-ffffffffffff/model/{f.name}", f.read_bytes())
    storage.write_bytes(f"{runs}/train/half-000000000000/model/config.json", b"{}")  # unfinished
    (listed,) = list_models(runs)
    assert listed["version"] == record["version"]
    assert listed["artifact"] == f"{runs}/train/base-ffffffffffff/model"

    write_serving_pointer(runs, listed["artifact"])
    assert list_models(runs)[0]["served"] is True


def test_one_artifact_resolution_for_every_stage(tmp_path, monkeypatch):
    """Evaluation, fine-tuning, export and serving resolve a model the same way: a config.json
    without its weights is not an artifact anywhere, and `@serving` works in eval too."""
    from lmforge import ConfigError
    from lmforge.eval.config import EvalConfig
    from lmforge.eval.stage import validate
    from lmforge.model.artifact import is_artifact, resolve_artifact

    save_tiny(tmp_path / "runs" / "train" / "base-1" / "model")
    half = tmp_path / "half" / "model"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert not is_artifact(str(half))
    with pytest.raises(ConfigError, match="half is not a model artifact"):
        resolve_artifact(str(half.parent))
    monkeypatch.chdir(tmp_path)
    write_serving_pointer("runs", "runs/train/base-1/model")
    assert resolve_artifact("runs/@serving") == "runs/train/base-1/model"  # as stored: relative
    validate(EvalConfig(model="runs/@serving", tasks=[]))
    with pytest.raises(ConfigError, match="nothing is served yet under elsewhere"):
        validate(EvalConfig(model="elsewhere/@serving", tasks=[]))
