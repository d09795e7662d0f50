"""The model artifact: one directory that every stage after training takes.

model.safetensors     the consolidated weights (a tied head is stored once, as the embedding)
config.json           the LlamaConfig fields
tokenizer.json        the tokenizer the model was trained with
resolved_config.yaml  the config of the run that made it
version.json          the version id (a hash of the weights) and lineage (below)

This module owns those names, the question "is this an artifact?" and the one resolution of
what a user may give where an artifact is expected (`resolve_artifact`). torch is imported only
by the functions that read or write weights, so the names and resolution stay cheap to import.

Versions and lineage.

A version id is derived from the weights' content: `v-` + the first 12 hex digits of the
SHA-256 of `model.safetensors`, so the same weights always get the same id, wherever they
live. `save_artifact` writes `<artifact>/version.json` next to the weights with the id and
what the trainer knows of the artifact's lineage:

    {"version": "v-3f2a9c0d1b7e", "parent": "v-...", "parent_path": ".../model",
     "data_manifest_hash": "...", "config_hash": "...", "created": "2026-01-01T00:00:00Z",
     "stage": "train", "run": "base-1a2b3c4d5e6f", "val_bpb": 1.23, "val_bpb_source": null,
     "eval_report": null}

`val_bpb` is the artifact's bits per byte on its training data's val split, the baseline of
serving's drift ratio: pretraining's packed val split (`val_bpb_source` null), a fine-tune's
val split on its target tokens (`"finetune val split"`), or, for a fine-tune without a val
split of its own, its parent's (`"parent v-..."`, see finetune/stage.py).

An artifact without version.json (older ones, `lmforge import`) gets the same id computed on
the fly and empty lineage.

The serving pointer (which version is served) is read beside the run references in
lmforge/stage.py; `write_serving_pointer` here checks the artifact and records its version.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from lmforge import ConfigError, LmforgeError, storage

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
        from lmforge.stage import served_artifact_path

        runs_dir = path.rstrip("/").removesuffix("@serving").rstrip("/") or "runs"
        path = served_artifact_path(runs_dir, path)
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

    `lineage` holds any of LINEAGE_FIELDS (parent, parent_path,
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


# Every field read_version returns; version.json may carry more (kept as they are).
LINEAGE_FIELDS: tuple[str, ...] = (
    "parent",
    "parent_path",
    "data_manifest_hash",
    "config_hash",
    "created",
    "stage",
    "run",
    "val_bpb",
    "val_bpb_source",
    "eval_report",
)

_CHUNK = 8 << 20


def version_of_bytes(weights: bytes) -> str:
    """The version id of weights given as the bytes of model.safetensors."""
    return "v-" + hashlib.sha256(weights).hexdigest()[:12]


def content_version(artifact_dir: str) -> str:
    """The version id of an artifact, hashed from its weights file (streamed, not loaded)."""
    path = storage.join(artifact_dir, WEIGHTS)
    fs, p = storage.resolve(path)
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(p) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except storage.pa_errors() as e:
        raise LmforgeError(
            f"{artifact_dir} is not a model artifact: cannot read {WEIGHTS} ({e})"
        ) from None
    return "v-" + digest.hexdigest()[:12]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_version(artifact_dir: str, version: str | None = None, **lineage: Any) -> dict[str, Any]:
    """Write `<artifact_dir>/version.json` atomically and return it.

    `version` defaults to the id hashed from the weights (pass it when the caller already has
    the weights' bytes); `lineage` holds any of LINEAGE_FIELDS (others are kept too);
    `created` defaults to now.
    """
    record: dict[str, Any] = {"version": version or content_version(artifact_dir)}
    record.update({name: None for name in LINEAGE_FIELDS})
    record.update(lineage)
    record["created"] = record["created"] or now_iso()
    storage.write_json(storage.join(artifact_dir, VERSION_FILE), record)
    return record


def read_version(artifact_dir: str) -> dict[str, Any]:
    """The version and lineage of an artifact: its version.json, every LINEAGE_FIELDS key
    present (None when unknown); without version.json the id is computed from the weights."""
    path = storage.join(artifact_dir, VERSION_FILE)
    record: dict[str, Any] = {"version": None, **{name: None for name in LINEAGE_FIELDS}}
    if storage.exists(path):
        try:
            stored = storage.read_json(path)
        except ValueError as e:
            raise LmforgeError(f"{path}: not valid JSON ({e}); delete it to recompute") from None
        if not isinstance(stored, dict):
            raise LmforgeError(f"{path}: expected a JSON object; delete it to recompute")
        record.update(stored)
    if not record["version"]:
        record["version"] = content_version(artifact_dir)
    return record


def write_serving_pointer(runs_dir: str, artifact: str, **extra: Any) -> dict[str, Any]:
    """Point serving at `artifact` (atomic write); returns the pointer written.

    `version` is read from the artifact unless given; `extra` (e.g. reason="promoted by
    improve", previous=...) is stored as is. The previous pointer, if any, is kept as
    `previous` so a rollback can name it.
    """
    from lmforge.stage import store_serving_pointer

    if not storage.exists(storage.join(artifact, WEIGHTS)):
        raise LmforgeError(f"cannot serve {artifact}: no {WEIGHTS} there (not a model artifact)")
    version = extra.pop("version", None) or read_version(artifact)["version"]
    return store_serving_pointer(runs_dir, artifact, version, **extra)
