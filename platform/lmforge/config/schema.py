"""What a config class says about itself: the type of a dotted key, a suggestion for a
misspelled one, and each field's type, default and description as users read them (`--help`,
docs/config-reference.md, error messages)."""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from lmforge import ConfigError


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation like `Sub`, `Sub | None`, or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def field_annotation(cls: type[BaseModel], dotted: str, strict: bool = True) -> Any:
    """The annotation of a dotted field path; an unknown key raises a ConfigError (if strict)."""
    model: type[BaseModel] | None = cls
    annotation: Any = None
    parts = dotted.split(".")
    for part in parts:
        if model is None:
            # Inside a free-form dict (e.g. dict[str, Any]): no further type information.
            return None
        fields = model.model_fields
        if part not in fields:
            if not strict:
                return None
            raise ConfigError(f"unknown key '{dotted}'{suggest_key(cls, dotted)}")
        annotation = fields[part].annotation
        model = model_of(annotation)
        if model is None and _list_entry_model(annotation) is not None and part != parts[-1]:
            # `--set tasks.0.file=x` would make a mapping {"0": ...} where a list belongs
            raise ConfigError(
                f"--set {dotted}: '{part}' is a list; set the whole list, e.g. "
                f"--set '{part}=[{{...}}, ...]', or edit it in the YAML file"
            )
    return annotation


def is_str_annotation(annotation: Any) -> bool:
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return non_none == [str]
    return False


def suggest_key(cls: type[BaseModel], dotted: str, shown_prefix: str = "") -> str:
    """` (did you mean 'x'?)` or `; valid keys here: ...` for an unknown dotted key of `cls`."""
    parent, _, leaf = dotted.rpartition(".")
    owner = model_of(field_annotation(cls, parent, strict=False)) if parent else cls
    hint = getattr(owner, "key_hints", {}).get(leaf) if owner else None
    if hint:
        return f" (did you mean '{shown_prefix}{parent + '.' if parent else ''}{hint}'?)"
    keys = [f.key for f in describe_fields(cls) if "[]" not in f.key]
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{shown_prefix}{close[0]}'?)"
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    return f"; valid keys here: {', '.join(siblings)}" if siblings else ""


# ---------------------------------------------------------------- documentation


@dataclass(frozen=True)
class FieldDoc:
    key: str  # dotted; `[].` steps into each entry of a list, e.g. `sources[].path`
    type: str
    default: str
    description: str
    section: bool = False  # a nested config whose own fields follow


def describe_fields(cls: type[BaseModel], prefix: str = "", entries: bool = True) -> list[FieldDoc]:
    """Every leaf field of a config, dotted, with type, default and description; with
    `entries`, the fields of a list's entries too when they are one config class
    (`sources[].path`; one level deep)."""
    docs: list[FieldDoc] = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        sub = model_of(field.annotation)
        if sub is not None:
            docs.append(FieldDoc(key, "mapping", "", field.description or "", section=True))
            docs.extend(describe_fields(sub, prefix=f"{key}.", entries=entries))
            continue
        default = "(required)" if field.is_required() else yaml_inline(field_default(field))
        docs.append(FieldDoc(key, type_name(field.annotation), default, field.description or ""))
        entry = _list_entry_model(field.annotation) if entries else None
        if entry is not None:
            docs.extend(describe_fields(entry, prefix=f"{key}[].", entries=False))
    return docs


def field_default(field: Any) -> Any:
    """A field's default as plain data; config objects keep only the keys that differ from
    their own defaults, so a default list of sources reads `[{path: builtin:python-docs}]`."""
    value = field.get_default(call_default_factory=True)
    return _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return json.loads(json.dumps(value, default=str))


class _InlineDumper(yaml.SafeDumper):
    """Flow-style YAML on one line: strings with newlines or tabs are double-quoted (`"\\n"`)."""


_InlineDumper.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar(
        "tag:yaml.org,2002:str", s, style='"' if any(c in s for c in "\n\r\t") else None
    ),
)


def yaml_inline(value: Any) -> str:
    """`value` as one line of YAML, as a user would write it in a config file."""
    text = yaml.dump(
        value, Dumper=_InlineDumper, default_flow_style=True, width=1 << 30, sort_keys=False
    )
    return text.strip().removesuffix("...").strip()


def type_name(annotation: Any) -> str:
    """A type as users write its values: `int | null`, `bf16 | fp32`, `list of str`,
    `list of steps (normalize | length | ...)`; never a Python repr."""
    if annotation is None:
        return ""
    annotation, discriminator = unwrap_annotated(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        if discriminator:
            tags = [t for m in args for t in discriminator_tags(m, discriminator)]
            return f"{discriminator} ({' | '.join(tags)})"
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        item = type_name(args[0]) if args else "any"
        if " (" in item:  # a discriminated union: `list of steps (normalize | ...)`
            word, _, rest = item.partition(" ")
            return f"list of {word}s {rest}"
        if item == "mapping":
            return "list of mappings"
        return f"list of {f'({item})' if ' | ' in item else item}"
    if origin is dict:
        value = type_name(args[1]) if len(args) == 2 else "any"
        return "mapping" if value == "any" else f"mapping of {type_name(args[0])} to {value}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def unwrap_annotated(annotation: Any) -> tuple[Any, str | None]:
    """`Annotated[X, Field(discriminator=...)]` -> (X, the discriminator field name)."""
    discriminator = None
    while typing.get_origin(annotation) is typing.Annotated:
        inner, *meta = typing.get_args(annotation)
        for m in meta:
            found = getattr(m, "discriminator", None)
            discriminator = found if isinstance(found, str) else discriminator
        annotation = inner
    return annotation, discriminator


def discriminator_tags(member: Any, discriminator: str) -> list[str]:
    """The tag values (`step: length`) that select `member` of a discriminated union."""
    field = getattr(member, "model_fields", {}).get(discriminator)
    return [str(a) for a in typing.get_args(field.annotation)] if field else []


def _list_entry_model(annotation: Any) -> type[BaseModel] | None:
    """The config class of a list's entries (`list[Source]`, `list[str | TaskSpec]`), if one."""
    annotation, _ = unwrap_annotated(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = non_none[0] if len(non_none) == 1 else None
    if typing.get_origin(annotation) is not list:
        return None
    entry, discriminator = unwrap_annotated(typing.get_args(annotation)[0])
    if discriminator:
        return None  # several configs, one per tag: documented with the tags instead
    return model_of(entry)


def fields_help(cls: type[BaseModel]) -> str:
    """The config fields as text for `--help`: one entry per field, from its description."""
    lines = []
    for doc in describe_fields(cls):
        if doc.section:
            lines.append(f"  {doc.key}: {doc.description}")
            continue
        default = "required" if doc.default == "(required)" else f"default {doc.default}"
        lines.append(f"  {doc.key} ({doc.type}, {default})")
        if doc.description:
            lines.append(f"      {doc.description}")
    return "\n".join(lines)


def fields_markdown(cls: type[BaseModel]) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for doc in describe_fields(cls):
        cells = [
            f"`{doc.key}`",
            f"`{doc.type}`",
            f"`{doc.default}`" if doc.default else "",
            doc.description,
        ]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
