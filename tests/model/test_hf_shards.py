"""`lmforge import` reads only the shard files beside a sharded model's index: an index naming
`..`, an absolute path or a URI is refused in one line; a well-formed sharded folder imports."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import LmforgeError
from lmforge.model.artifact import load_model
from lmforge.model.hf import export_hf, import_hf
from tests.model.test_hf import make_artifact


@pytest.fixture
def sharded(tmp_path):
    """An HF folder split into two shards with its model.safetensors.index.json."""
    make_artifact(tmp_path / "art", tie=False)
    hf = tmp_path / "hf"
    export_hf(str(tmp_path / "art"), str(hf))
    tensors = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(hf / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return hf


def test_a_sharded_folder_imports(sharded, tmp_path):
    import_hf(str(sharded), str(tmp_path / "back"))
    a, b = load_model(str(tmp_path / "art")), load_model(str(tmp_path / "back"))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize(
    "shard", ["../art/model.safetensors", "/etc/passwd", "s3://bucket/x.safetensors", "..", "a\\b"]
)
def test_an_index_pointing_outside_the_folder_is_refused(sharded, tmp_path, shard):
    index = sharded / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map[next(iter(weight_map))] = shard
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        LmforgeError, match=f"names the shard {re.escape(repr(shard))}.*not a file in"
    ):
        import_hf(str(sharded), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_an_index_without_a_weight_map_is_refused(sharded, tmp_path):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(LmforgeError, match="no weight_map"):
        import_hf(str(sharded), str(tmp_path / "x"))
