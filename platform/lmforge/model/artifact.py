"""The model artifact: one directory that every stage after training takes.

model.safetensors     the consolidated weights (a tied head is stored once, as the embedding)
config.json           the LlamaConfig fields
tokenizer.json        the tokenizer the model was trained with
resolved_config.yaml  the config of the run that made it
version.json          the version id (a hash of the weights) and lineage (model/version.py)

This module owns those names, the question "is this an artifact?" and the one resolution of
what a user may give where an artifact is expected (`resolve_artifact`). torch is imported only
by the functions that read or write weights, so the names and resolution stay cheap to import.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lmforge import ConfigError, storage

if TYPE_CHECKING:
    import torch

    from lmforge.model.llama import Llama, LlamaConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
RESOLVED = "resolved_config.yaml"
VERSION_FILE = "version.json"


def is_artifact(path: str) -> bool:
    """Whether `path` holds a model artifact: its weights and config.json."""
    return storage.exists(storage.join(path, CONFIG)) and storage.exists(
        storage.join(path, WEIGHTS)
    )


def resolve_artifact(path: str) -> str:
    """The artifact directory that `path` names: an artifact dir, a training run dir holding
    one under model/, a run named as `[<runs_dir>/]@<stage>/<run name>` (the latest complete
    output of that run; see `lmforge.stage.read_run_reference`), e.g.
    `/mnt/lmforge/runs/@train/base`, or `[<runs_dir>/]@serving`: the artifact the serving
    pointer names (what `lmforge improve` promoted last).

    The result is as the reference stores it, relative to `runs_dir` when that is relative (a
    config hashes the path it names); a caller that hands it to a Ray actor in another working
    directory makes it `storage.absolute`."""
    if path.rstrip("/").endswith("@serving"):
        from lmforge.stage import read_serving_pointer

        runs_dir = path.rstrip("/").removesuffix("@serving").rstrip("/") or "runs"
        pointer = read_serving_pointer(runs_dir)
        if not pointer:
            raise ConfigError(
                f"{path}: nothing is served yet under {runs_dir} (no serving/current.json); "
                "run `lmforge improve` or give an artifact path"
            )
        path = pointer["artifact"]
    elif path.startswith("@") or "/@" in path:
        from lmforge.stage import read_run_reference

        runs_dir, _, ref = path.rpartition("@")
        path = read_run_reference(runs_dir.rstrip("/") or "runs", "@" + ref, where="artifact")
    for candidate in (path, storage.join(path, "model")):
        if is_artifact(candidate):
            return candidate
    raise ConfigError(
        f"{path} is not a model artifact ({WEIGHTS} and {CONFIG}) nor a training run "
        "directory with one under model/; give an artifact dir, a run dir or @<stage>/<run name>"
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

    from lmforge.model.version import version_of_bytes, write_version

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


def load_model_config(directory: str) -> LlamaConfig:
    """The architecture of an artifact (its config.json)."""
    from lmforge.model.llama import LlamaConfig

    return LlamaConfig.from_dict(json.loads(storage.read_text(storage.join(directory, CONFIG))))


def load_model(directory: str, device: str | torch.device = "cpu") -> Llama:
    """The model of an artifact, weights loaded, in eval mode."""
    import torch
    from safetensors.torch import load

    from lmforge.model.llama import Llama

    cfg = load_model_config(directory)
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
