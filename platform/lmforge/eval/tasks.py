"""Task definitions and task files: what to ask the model, and how to load it without aborting.

A task is a `TaskSpec` (inline in the eval config, or a YAML file of the same fields) over a
JSONL file with one item per line. The schema of an item depends on the task type:

    multiple_choice  {"context": str, "choices": [str, ...], "answer": int}
    classification   {"context": str, "label": str}          (labels: the task's `labels`)
    generation       {"prompt": str, "references": [str, ...]}
    perplexity       {"text": str}                           (or `sources:` the data stage reads)
    bias_pairs       {"sent_more": str, "sent_less": str, "bias_type": str}   (CrowS-Pairs columns)

Any other fields are kept, so a `prompt` template can use them (`"Q: {question}\\nA:"`). A line
that is not JSON, not an object, or lacks a required field is reported as `file:line: why` and
skipped; the rest of the file is still evaluated.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge import ConfigError, storage
from lmforge.config import StrictModel, build_config, read_yaml
from lmforge.data.config import SourceConfig

TaskType = Literal["multiple_choice", "classification", "generation", "perplexity", "bias_pairs"]

DEFAULT_METRICS: dict[str, list[str]] = {
    "multiple_choice": ["acc", "acc_norm"],
    "classification": ["acc", "macro_f1"],
    "generation": ["exact_match", "f1"],
    "perplexity": ["loss", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity"],
    "bias_pairs": ["pct_stereotype", "likelihood_diff"],
}
DEFAULT_PROMPT = {
    "multiple_choice": "{context}",
    "classification": "{context}",
    "generation": "{prompt}",
}


class TaskSpec(StrictModel):
    """One eval task: its items, how to prompt, and what to measure."""

    key_hints = {"path": "file"}  # a data source says `path:`; a task says `file:`

    name: str = Field(description="Task name: the key in report.json.")
    type: TaskType = Field(description="How items are scored (see docs/evaluation.md).")
    file: str | None = Field(
        None,
        description="JSONL items (local path or URI; relative to the task YAML), or `builtin:NAME`.",
    )
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="perplexity only: read documents with the data stage's readers instead of `file`.",
    )
    prompt: str | None = Field(
        None,
        description="Template (Python str.format over the item's fields), e.g. 'Q: {question}\\nA:'. Default: {context} or {prompt}.",
    )
    target_delimiter: str = Field(
        " ", description="Between the prompt and a choice (or a few-shot answer)."
    )
    fewshot_delimiter: str = Field("\n\n", description="Between few-shot examples.")
    few_shot: int = Field(
        0,
        ge=0,
        description="Solved examples before each item, drawn (seeded) from the other items.",
    )
    few_shot_seed: int = Field(1234, description="Seed of the few-shot draw.")
    labels: list[str] | None = Field(
        None, description="classification: the classes. Default: the labels seen in the file."
    )
    metrics: list[str] | None = Field(
        None, description="Metrics to report (and gate on). Default: all of the task type's."
    )
    stop: list[str] = Field(
        default_factory=lambda: ["\n\n"], description="generation: stop sequences."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="generation: token limit. Default: the eval config's."
    )
    limit: int | None = Field(
        None, ge=1, description="Evaluate at most this many items (the first valid ones)."
    )

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if not self.file and not (self.type == "perplexity" and self.sources):
            raise ValueError(f"task '{self.name}': give `file` (or, for perplexity, `sources`)")
        unknown = set(self.metrics or []) - set(DEFAULT_METRICS[self.type])
        if unknown:
            raise ValueError(
                f"task '{self.name}': metric(s) {sorted(unknown)} do not apply to {self.type}; "
                f"choose from {DEFAULT_METRICS[self.type]}"
            )
        return self

    @property
    def metric_names(self) -> list[str]:
        return self.metrics or DEFAULT_METRICS[self.type]


@dataclass
class Items:
    """The valid items of a task (each with its 1-based line) and the problems found."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_task_file(path: str) -> TaskSpec:
    """A task YAML; its relative `file` is resolved against the YAML's directory."""
    data = read_yaml(path)
    spec = build_config(TaskSpec, data, source=path)
    if spec.file and not spec.file.startswith("builtin:") and not _absolute(spec.file):
        base = os.path.dirname(path) if not storage.is_uri(path) else path.rsplit("/", 1)[0]
        spec = spec.model_copy(update={"file": storage.join(base, spec.file)})
    return spec


def _absolute(path: str) -> bool:
    return storage.is_uri(path) or os.path.isabs(path)


def builtin_task(name: str) -> TaskSpec:
    """The TaskSpec of `builtin:NAME` (the task table lives with the built-in data)."""
    from lmforge.builtin.tasks import BUILTIN_TASKS

    if name not in BUILTIN_TASKS:
        raise ConfigError(
            f"unknown built-in task 'builtin:{name}'; built in: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_TASKS)
        )
    return TaskSpec(name=name, file=f"builtin:{name}", **BUILTIN_TASKS[name])


def resolve_task(ref: str | TaskSpec) -> TaskSpec:
    """A TaskSpec from an inline spec, `builtin:NAME`, or a task YAML path."""
    if isinstance(ref, TaskSpec):
        return ref
    if ref.startswith("builtin:"):
        return builtin_task(ref.removeprefix("builtin:"))
    if not storage.exists(ref):
        raise ConfigError(f"tasks: no task file {ref} (give builtin:NAME, a YAML file, or a spec)")
    return load_task_file(ref)


# ---------------------------------------------------------------- reading items


REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "multiple_choice": {"context": str, "choices": list, "answer": int},
    "classification": {"context": str, "label": (str, int)},
    "generation": {"prompt": str, "references": (list, str)},
    "perplexity": {"text": str},
    "bias_pairs": {"sent_more": str, "sent_less": str},
}


def check_item(task_type: str, item: Any) -> str:
    """Why an item does not fit its task type's schema ('' when it does)."""
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    for key, kind in REQUIRED[task_type].items():
        if key not in item:
            return f"missing field '{key}'"
        value = item[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            return f"field '{key}' must be {names}, got {type(value).__name__}"
    if task_type == "multiple_choice":
        choices = item["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            return "field 'choices' must be a list of at least 2 strings"
        if not 0 <= item["answer"] < len(choices):
            return f"answer {item['answer']} is out of range for {len(choices)} choices"
    if task_type == "generation":
        refs = item["references"]
        refs = [refs] if isinstance(refs, str) else refs
        if not refs or not all(isinstance(r, str) for r in refs):
            return "field 'references' must be a string or a non-empty list of strings"
    return ""


def read_jsonl_items(path: str, task_type: str, limit: int | None = None) -> Items:
    """Valid items of a JSONL task file; malformed lines become `path:line: why` problems."""
    items = Items()
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        items.problems.append(f"{path}: no such file")
        return items
    except UnicodeDecodeError as e:
        items.problems.append(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
        return items
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            items.problems.append(f"{path}:{n}: not valid JSON ({e})")
            continue
        why = check_item(task_type, item)
        if why:
            items.problems.append(f"{path}:{n}: {why}")
            continue
        if limit is not None and len(items.rows) >= limit:
            continue  # keep reading: problems further down are still reported
        items.rows.append(item)
        items.lines.append(n)
    return items


def read_source_items(sources: list[SourceConfig], limit: int | None) -> Items:
    """perplexity documents from data-stage sources ({"text": ...}); rejects become problems."""
    from lmforge.data.readers import read_file
    from lmforge.data.sources import resolve_sources

    items = Items()
    for src, files in zip(sources, resolve_sources(sources), strict=True):
        for item in files:
            for table in read_file(src, item, 64 << 20, 1024):
                for row in table.to_pylist():
                    where = f"{item['path']}:{row['line']}"
                    if row["reject"]:
                        items.problems.append(f"{where}: {row['reject']}")
                    elif limit is None or len(items.rows) < limit:
                        items.rows.append({"text": row["text"]})
                        items.lines.append(row["line"])
    return items


def load_items(spec: TaskSpec) -> Items:
    if spec.type == "perplexity" and spec.sources:
        items = read_source_items(spec.sources, spec.limit)
    elif spec.file and spec.file.startswith("builtin:"):
        from lmforge.builtin.tasks import builtin_items

        rows = builtin_items(spec.file.removeprefix("builtin:"))[: spec.limit]
        items = Items(rows=rows, lines=list(range(1, len(rows) + 1)))
    else:
        items = read_jsonl_items(spec.file or "", spec.type, spec.limit)
    if spec.type in DEFAULT_PROMPT:
        _check_rows(spec, items)
    return items


def _check_rows(spec: TaskSpec, items: Items) -> None:
    """Drop (and report) items whose fields the prompt template does not find, and
    classification items whose label is not one of the task's labels."""
    template = spec.prompt or DEFAULT_PROMPT[spec.type]
    keep = Items(problems=items.problems)
    for row, line in zip(items.rows, items.lines, strict=True):
        try:
            template.format(**row)
        except (KeyError, IndexError, ValueError) as e:
            keep.problems.append(f"{spec.file}:{line}: prompt template: {type(e).__name__}: {e}")
            continue
        if spec.type == "classification" and spec.labels and str(row["label"]) not in spec.labels:
            keep.problems.append(f"{spec.file}:{line}: label {row['label']!r} is not in `labels`")
            continue
        keep.rows.append(row)
        keep.lines.append(line)
    items.rows, items.lines = keep.rows, keep.lines


# ---------------------------------------------------------------- prompts


def class_labels(spec: TaskSpec, items: Items) -> list[str]:
    return spec.labels or sorted({str(r["label"]) for r in items.rows})


def references(item: dict[str, Any]) -> list[str]:
    refs = item["references"]
    return [refs] if isinstance(refs, str) else list(refs)


def target_text(spec: TaskSpec, item: dict[str, Any]) -> str:
    """The correct answer of an item as text, for few-shot examples."""
    if spec.type == "multiple_choice":
        return item["choices"][item["answer"]]
    if spec.type == "classification":
        return str(item["label"])
    return references(item)[0]


def render_prompt(spec: TaskSpec, items: Items, index: int) -> str:
    """The item's prompt, preceded by `few_shot` solved examples drawn from the other items."""
    template = spec.prompt or DEFAULT_PROMPT[spec.type]
    parts = []
    if spec.few_shot:
        rng = random.Random(f"{spec.few_shot_seed}-{index}")
        others = [i for i in range(len(items.rows)) if i != index]
        for i in rng.sample(others, min(spec.few_shot, len(others))):
            ex = items.rows[i]
            parts.append(template.format(**ex) + spec.target_delimiter + target_text(spec, ex))
    parts.append(template.format(**items.rows[index]))
    return spec.fewshot_delimiter.join(parts)
