"""The model artifact: one directory that every stage after training takes.

model.safetensors     the consolidated weights (a tied head is stored once, as the embedding)
config.json           the LlamaConfig fields
tokenizer.json        the tokenizer the model was trained with
resolved_config.yaml  the config of the run that made it
version.json          the version id (a hash of the weights) and lineage (model/version.py)
"""

from __future__ import annotations

import json
from typing import Any

import torch

from lmforge import storage
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.model.version import version_of_bytes, write_version

WEIGHTS, CONFIG, TOKENIZER, RESOLVED = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "resolved_config.yaml",
)


def save_artifact(
    directory: str,
    state_dict: dict[str, torch.Tensor],
    cfg: LlamaConfig,
    tokenizer_json: str | None = None,
    resolved_config: str | None = None,
    lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an artifact; returns its version record (version.json, written after the weights).

    `lineage` holds any of model.version.LINEAGE_FIELDS (parent, parent_path,
    data_manifest_hash, config_hash, stage, run, val_bpb, ...)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if cfg.tie_embeddings:
        tensors.pop("output.weight", None)  # the same tensor as tok_embeddings.weight
    storage.makedirs(directory)
    weights = save(tensors, metadata={"format": "pt"})
    storage.write_bytes(storage.join(directory, WEIGHTS), weights)
    storage.write_json(storage.join(directory, CONFIG), cfg.to_dict())
    if tokenizer_json is not None:
        storage.write_text(storage.join(directory, TOKENIZER), tokenizer_json)
    if resolved_config is not None:
        storage.write_text(storage.join(directory, RESOLVED), resolved_config)
    return write_version(directory, version=version_of_bytes(weights), **(lineage or {}))


def load_config(directory: str) -> LlamaConfig:
    return LlamaConfig.from_dict(json.loads(storage.read_text(storage.join(directory, CONFIG))))


def load_model(directory: str, device: str | torch.device = "cpu") -> Llama:
    """The model of an artifact, weights loaded, in eval mode."""
    from safetensors.torch import load

    cfg = load_config(directory)
    with torch.device("meta"):
        model = Llama(cfg)
    tensors = load(storage.read_bytes(storage.join(directory, WEIGHTS)))
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = set(result.missing_keys) - ({"output.weight"} if cfg.tie_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{directory}: weights do not match config.json "
            f"(missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)})"
        )
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope()
    return model.to(device).eval()
