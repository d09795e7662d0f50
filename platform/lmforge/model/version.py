"""Model versions and lineage.

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

The serving pointer that names the version being served lives beside the run references, in
lmforge/stage.py.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from lmforge import LmforgeError, storage
from lmforge.model.artifact import VERSION_FILE, WEIGHTS

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
