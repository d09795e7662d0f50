"""Strict configs: pydantic models loaded from YAML, `--set a.b=c` overrides, a stable hash.

Every config in lmforge derives from `StrictModel`: an unknown or misspelled key is an error
that names the key (with a suggestion), values are validated and keep their types, and every
field carries a description that CLI help and docs/config-reference.md are generated from.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmforge import ConfigError

# What a config class says about itself (schema.py), importable from here as before.
from lmforge.config.schema import (
    FieldDoc,
    describe_fields,
    discriminator_tags,
    field_annotation,
    field_default,
    fields_help,
    fields_markdown,
    is_str_annotation,
    model_of,
    suggest_key,
    type_name,
    unwrap_annotated,
    yaml_inline,
)

T = TypeVar("T", bound="StrictModel")

# Fields whose value says where or how verbosely to run, not what to compute: they stay out of
# the config hash, so moving the runs directory does not invalidate finished stages.
NOT_HASHED = {"hash": False}


class StrictModel(BaseModel):
    """Base of every lmforge config: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)
    # Unknown key -> the field meant, for mistakes too far from the name for difflib to catch
    # (e.g. a task's `path:` for `file:`); the error then says "did you mean".
    key_hints: ClassVar[dict[str, str]] = {}


# ---------------------------------------------------------------- loading and overrides


def read_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping from a local path or URI; a missing file or bad YAML is a ConfigError."""
    from lmforge import storage

    if storage.is_dir(path):
        raise ConfigError(f"{path} is a directory; give a YAML config file")
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is it a YAML file?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> tuple[str, str]:
    """Split `a.b=value` into its dotted key and raw value."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"bad override {text!r}: expected KEY.PATH=VALUE, e.g. --set optim.lr=3e-4"
        )
    return key, value


def apply_overrides(
    cls: type[BaseModel], data: dict[str, Any], overrides: list[str]
) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b=value` override applied.

    The value is read as YAML (numbers, booleans, lists, mappings), except where the field is a
    string, so `--set name=007` stays the string "007". Unknown keys are refused here, naming
    the key, before any type checking.
    """
    data = json.loads(json.dumps(data, default=str)) if data else {}
    for text in overrides:
        key, raw = parse_override(text)
        annotation = field_annotation(cls, key)
        value: Any = raw if is_str_annotation(annotation) else _yaml_scalar(key, raw)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def build_config(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate `data` as `cls`; the first problem becomes a one-line ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        from lmforge.config.errors import format_validation_error

        raise ConfigError(f"{source}: {format_validation_error(cls, e)}") from None


def load_config(cls: type[T], path: str | None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file (or from defaults when `path` is None) plus overrides."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(cls, data, list(overrides or []))
    return build_config(cls, data, source=path or "config")


def _yaml_scalar(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None


# ---------------------------------------------------------------- resolved config and hash


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-able data, every default filled in."""
    return cfg.model_dump(mode="json")


def config_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_dict(cfg), sort_keys=False, default_flow_style=False)


def config_hash(cfg: BaseModel, length: int = 12) -> str:
    """sha256 of the canonical JSON of the config, fields marked NOT_HASHED left out.

    Canonical: keys sorted, no whitespace, every default filled in, so the hash is the same
    across runs and machines and changes with any value that changes what a stage computes.
    """
    data = _hashed_part(cfg)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def _hashed_part(value: Any) -> Any:
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("hash", True):
                out[name] = _hashed_part(getattr(value, name))
        return out
    if isinstance(value, dict):
        return {str(k): _hashed_part(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_hashed_part(v) for v in value]
    return json.loads(json.dumps(value, default=str))


__all__ = [
    "FieldDoc",
    "NOT_HASHED",
    "StrictModel",
    "apply_overrides",
    "build_config",
    "config_dict",
    "config_hash",
    "config_yaml",
    "describe_fields",
    "discriminator_tags",
    "field_annotation",
    "field_default",
    "fields_help",
    "fields_markdown",
    "is_str_annotation",
    "load_config",
    "model_of",
    "parse_override",
    "read_yaml",
    "suggest_key",
    "type_name",
    "unwrap_annotated",
    "yaml_inline",
]
