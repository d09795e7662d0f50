"""One line for a pydantic ValidationError, naming the key as the user wrote it.

Pydantic locates an error inside a union by the member it tried (`tasks.0.str`,
`steps.0.length.min_word`) and reports every member's failure. A user wrote one entry, meant
for one member: this module maps pydantic's location onto the config's own path
(`tasks[0]`), keeps the errors of the member the input was meant for (a mapping was meant for
the config class, not for `str`), and words the first of them: `tasks[0]: unknown key 'path'
(did you mean 'file'?)`, `steps[0]: unknown step 'lenght' (did you mean 'length'?)`.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from lmforge.config.schema import discriminator_tags, suggest_key, type_name, unwrap_annotated

# Error types that only say "the input is not of this member's type".
_MISMATCH_SUFFIX = "_type"


@dataclass
class Located:
    error: dict[str, Any]
    path: list[str | int]  # the user's path: field names and list indexes
    annotation: Any  # the type at the end of the path (None: unknown)
    discriminator: str | None
    # The last union the location went through: (path at the union, member tag), and whether
    # the error is at that member itself (its input was not of the member's type at all).
    branch: tuple[tuple[str | int, ...], str] | None = None
    at_member: bool = False
    union: Any = None  # the annotation of that union
    models: dict[int, type[BaseModel]] = field(default_factory=dict)  # path length -> model


@dataclass(frozen=True)
class _Discriminated:
    discriminator: str | None  # read back by `unwrap_annotated`, as from a pydantic Field


def format_validation_error(cls: type[BaseModel], error: ValidationError) -> str:
    located = [locate(cls, e) for e in error.errors()]
    chosen = _meant(located)
    # An unknown key usually explains a "missing" one next to it (`pth:` for `path:`).
    chosen.sort(key=lambda x: x.error["type"] != "extra_forbidden")
    first = chosen[0]
    more = len(chosen) - 1
    more_text = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return _describe(first) + more_text


def locate(cls: type[BaseModel], error: dict[str, Any]) -> Located:
    """Walk pydantic's `loc` through the config's annotations (see the module docstring)."""
    where = Located(error, [], cls, None)
    annotation: Any = cls
    loc = list(error["loc"])
    while True:
        annotation, discriminator = unwrap_annotated(annotation)
        members = _union_members(annotation)
        if len(members) == 1:  # `X | None`: pydantic adds no member tag to the location
            annotation = members[0]
            continue
        if members and loc:
            tag = str(loc.pop(0))
            where.branch, where.at_member = (tuple(where.path), tag), True
            where.union = typing.Annotated[annotation, _Discriminated(discriminator)]
            annotation = _member(members, tag, discriminator)
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            where.models[len(where.path)] = annotation
        if not loc:
            where.annotation, where.discriminator = annotation, discriminator
            if discriminator:
                where.annotation = typing.Annotated[annotation, _Discriminated(discriminator)]
            return where
        part = loc.pop(0)
        where.path.append(part)
        where.at_member = False
        annotation = _step(annotation, part)


def _step(annotation: Any, part: str | int) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found = annotation.model_fields.get(str(part))
        return found.annotation if found else None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple, set, frozenset) and isinstance(part, int):
        return args[0] if args else None
    if origin is dict:
        return args[1] if len(args) == 2 else None
    return None


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return []
    return [a for a in typing.get_args(annotation) if a is not type(None)]


def _member(members: list[Any], tag: str, discriminator: str | None) -> Any:
    """The union member pydantic names `tag`: a discriminator value (`length`), or its own
    label of the member (`str`, `list[str]`, `function-after[_check(), TaskSpec]`)."""
    for m in members:
        if discriminator and tag in discriminator_tags(m, discriminator):
            return m
        name = getattr(m, "__name__", "")
        if isinstance(m, type) and issubclass(m, BaseModel) and name in tag.replace(",", " "):
            return m
        origin = typing.get_origin(m)
        if tag == name or (origin is not None and tag.startswith(origin.__name__)):
            return m
    return None


def _meant(located: list[Located]) -> list[Located]:
    """Leave out a union member's "not my type" errors when another member of the same union
    got past that check (the input was meant for that one); if none did, one error for the
    union."""
    meant = {x.branch[0] for x in located if x.branch is not None and not _mismatch(x)}
    kept, reported = [], set()
    for x in located:
        if _mismatch(x):
            if x.branch[0] in meant or x.branch[0] in reported:
                continue
            reported.add(x.branch[0])
        kept.append(x)
    return kept


def _mismatch(x: Located) -> bool:
    return x.branch is not None and x.at_member and x.error["type"].endswith(_MISMATCH_SUFFIX)


def format_path(path: list[str | int] | tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _split(where: Located) -> tuple[str, list[str | int], type[BaseModel] | None]:
    """(`tasks[0]`, the rest of the path, the model at `tasks[0]`): an entry of a list is
    named by its index, and keys inside it relative to it."""
    last_index = max((i for i, p in enumerate(where.path) if isinstance(p, int)), default=-1)
    prefix = where.path[: last_index + 1]
    return format_path(prefix), where.path[last_index + 1 :], where.models.get(len(prefix))


def _describe(where: Located) -> str:
    e, kind = where.error, where.error["type"]
    prefix, rest, model = _split(where)
    head = f"{prefix}: " if prefix else ""
    relative = ".".join(str(p) for p in rest)
    if kind == "extra_forbidden":
        hint = suggest_key(model, relative) if model is not None else ""
        return f"{head}unknown key '{relative}'{hint}"
    if kind == "missing":
        return f"{head}missing required key '{relative}'"
    if kind == "union_tag_invalid":
        name = str(e["ctx"]["discriminator"]).strip("'\"")
        tags = _union_tags(where)
        close = difflib.get_close_matches(str(e["ctx"]["tag"]), tags, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{head}unknown {name} '{e['ctx']['tag']}'{hint}; one of: {', '.join(tags)}"
    if kind == "union_tag_not_found":
        name = str(e["ctx"]["discriminator"]).strip("'\"")
        return f"{head}missing key '{name}'; one of: {', '.join(_union_tags(where))}"
    msg = str(e["msg"]).removeprefix("Value error, ")
    if kind in ("model_type", "model_attributes_type"):  # not "or instance of OptimConfig"
        msg = "Input should be a mapping of keys to values"
    got = e.get("input")
    # a check of our own (value_error) words its message with the value already
    got_text = (
        f" (got {got!r})" if not isinstance(got, dict | list) and kind != "value_error" else ""
    )
    expected = type_name(where.annotation) if where.annotation is not None else ""
    if _mismatch(where):  # every member of the union refused the input: say what it takes
        msg, expected = "not a valid value", type_name(where.union)
    plain = kind == "value_error" or expected == "mapping"
    exp_text = f"; expected {expected}" if expected and not plain else ""
    name = format_path(where.path)
    return f"'{name}': {msg}{got_text}{exp_text}" if name else f"{msg}{got_text}"


def _union_tags(where: Located) -> list[str]:
    if not where.discriminator:
        return []
    members = _union_members(unwrap_annotated(where.annotation)[0])
    return [t for m in members for t in discriminator_tags(m, where.discriminator)]
