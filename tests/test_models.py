"""Model versions and lineage (model/version.py) and `lmforge models list/show`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lmforge import LmforgeError
from lmforge.model import version as mv


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
    assert mv.read_serving_pointer(runs) is None
    a = save_tiny(tmp_path / "a")
    b = save_tiny(tmp_path / "b", seed=1)
    first = mv.write_serving_pointer(runs, str(tmp_path / "a"), reason="first")
    assert first["version"] == a["version"] and first["reason"] == "first"
    assert "previous" not in first
    second = mv.write_serving_pointer(runs, str(tmp_path / "b"))
    assert mv.read_serving_pointer(runs) == second
    assert second["version"] == b["version"]
    assert second["previous"] == {"artifact": str(tmp_path / "a"), "version": a["version"]}
    with pytest.raises(LmforgeError, match="not a model artifact"):
        mv.write_serving_pointer(runs, str(tmp_path / "nowhere"))
