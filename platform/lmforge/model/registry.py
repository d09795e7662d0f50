"""Every model version under a runs dir (`lmforge models list` / `show`, in command.py).

An artifact is any `<runs_dir>/.../model/` directory with a `config.json` (so a new stage's
artifacts appear with no code change): `<runs_dir>/train/<run>/model`, the improvement loop's
`<runs_dir>/improve/<run>/model`, ... It is listed when its run is complete (`_SUCCESS` next to
`model/`) or it has its `version.json` (written last by save_artifact). For each: its version
and lineage (model/artifact.py), the eval runs that scored it, and whether serving points at it
(`<runs_dir>/serving/current.json`).
"""

from __future__ import annotations

import os
from typing import Any

from lmforge import LmforgeError, storage
from lmforge.model.artifact import CONFIG, VERSION_FILE, read_version
from lmforge.stage import read_serving_pointer

# Metrics shown in the eval summary, the first one a task has (else its first metric).
PRIMARY_METRICS = ("bits_per_byte", "acc_norm", "acc", "exact_match", "f1", "loss")


def _norm(path: str) -> str:
    return (
        os.path.abspath(os.path.expanduser(path)) if not storage.is_uri(path) else path.rstrip("/")
    )


def _tail(path: str) -> str:
    """`<stage>/<run>/model` of an artifact path: the same run whether the runs dir is mounted
    at /mnt/lmforge/runs in a pod, copied to a laptop, or named by an s3:// URI."""
    return "/".join(path.replace("\\", "/").rstrip("/").split("/")[-3:])


def _artifact_dirs(runs_dir: str) -> list[str]:
    suffix = f"/model/{CONFIG}"
    return [f[: -len(f"/{CONFIG}")] for f in storage.list_files(runs_dir, suffix=suffix)]


def _run_dir(artifact: str) -> str:
    return artifact.rstrip("/").rsplit("/", 1)[0]


def _is_listed(artifact: str) -> bool:
    complete = storage.is_complete(_run_dir(artifact))
    return complete or storage.exists(storage.join(artifact, VERSION_FILE))


def eval_summary(tasks: dict[str, dict[str, Any]]) -> str:
    """One short line of a report's tasks: `task:metric=value` of each task's primary metric."""
    parts = []
    for task, metrics in tasks.items():
        name = next((m for m in PRIMARY_METRICS if m in metrics), next(iter(metrics), None))
        if name is not None and isinstance(metrics[name], dict):
            parts.append(f"{task}:{name}={metrics[name].get('value', float('nan')):.4g}")
    return ", ".join(parts)


def _eval_reports(runs_dir: str) -> dict[str, list[dict[str, Any]]]:
    """Artifact path tail (`_tail`) -> the complete eval runs that scored it."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    eval_root = storage.join(runs_dir, "eval")
    for report_path in storage.list_files(eval_root, suffix="report.json", recursive=True):
        run_dir = report_path[: -len("report.json")].rstrip("/\\")
        if not storage.is_complete(run_dir):
            continue
        try:
            report = storage.read_json(report_path)
        except ValueError:
            continue  # a broken report names no model; the eval stage would have failed
        scored = [(report.get("model"), report.get("tasks") or {})]
        scored += [(c.get("model"), c.get("tasks") or {}) for c in report.get("checkpoints", [])]
        for model, tasks in scored:
            if isinstance(model, str):
                entry = {"report": report_path, "summary": eval_summary(tasks)}
                by_model.setdefault(_tail(model), []).append(entry)
    return by_model


def list_models(runs_dir: str) -> list[dict[str, Any]]:
    """Every listed artifact under `runs_dir`, oldest first: its version record plus
    `artifact`, `stage`/`run` (from the path when version.json does not say), `evals`
    and `served`."""
    if not storage.is_dir(runs_dir):
        raise LmforgeError(
            f"runs dir {runs_dir} does not exist; give the one your stages write to "
            "(--runs-dir, the configs' runs_dir)"
        )
    evals = _eval_reports(runs_dir)
    pointer = read_serving_pointer(runs_dir)
    served = _norm(pointer["artifact"]) if pointer else None
    models = []
    for artifact in _artifact_dirs(runs_dir):
        if not _is_listed(artifact):
            continue
        record = read_version(artifact)
        rel = artifact[len(runs_dir) :].strip("/\\").replace("\\", "/").split("/")
        record["stage"] = record["stage"] or (rel[0] if len(rel) > 2 else None)
        record["run"] = record["run"] or (rel[-2] if len(rel) > 2 else None)
        if record["created"] is None:
            record["created"] = _completed_at(artifact)
        found = list(evals.get(_tail(artifact), []))
        if record.get("eval_report") and storage.exists(record["eval_report"]):
            report = storage.read_json(record["eval_report"])
            found.insert(
                0,
                {
                    "report": record["eval_report"],
                    "summary": eval_summary(report.get("tasks") or {}),
                },
            )
        record.update(artifact=artifact, evals=found, served=_norm(artifact) == served)
        models.append(record)
    if pointer and not any(m["served"] for m in models):
        # The pointer may name the same weights elsewhere (a copy): match by version.
        for m in models:
            m["served"] = m["version"] == pointer.get("version")
    return sorted(models, key=lambda m: (m["created"] or "", m["artifact"]))


def _completed_at(artifact: str) -> str | None:
    try:
        return storage.read_json(storage.join(_run_dir(artifact), storage.SUCCESS))["completed_at"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def find_version(models: list[dict[str, Any]], version: str) -> list[dict[str, Any]]:
    """The artifacts with this version id (a unique prefix is enough, `v-` optional)."""
    want = version if version.startswith("v-") else f"v-{version}"
    exact = [m for m in models if m["version"] == want]
    return exact or [m for m in models if m["version"].startswith(want)]


def lineage(models: list[dict[str, Any]], version: str) -> dict[str, Any]:
    """One version's record with `copies` (other artifacts with the same weights) and
    `ancestors` (parent, grandparent, ... as far as the runs dir knows them)."""
    matches = find_version(models, version)
    if not matches:
        raise LmforgeError(f"no model version {version!r} here; `lmforge models list` shows them")
    if len({m["version"] for m in matches}) > 1:
        ids = ", ".join(sorted({m["version"] for m in matches}))
        raise LmforgeError(f"version prefix {version!r} is ambiguous ({ids}); give more of it")
    record = dict(matches[0])
    record["copies"] = [m["artifact"] for m in matches[1:]]
    by_version = {m["version"]: m for m in models}
    ancestors, seen, parent = [], {record["version"]}, record.get("parent")
    while parent and parent not in seen:
        seen.add(parent)
        found = by_version.get(parent)
        ancestors.append(found or {"version": parent, "artifact": record.get("parent_path")})
        parent = found.get("parent") if found else None
    record["ancestors"] = ancestors
    return record


# ---------------------------------------------------------------- command line


def _short(value: Any, width: int) -> str:
    text = "-" if value in (None, "") else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def models_table(models: list[dict[str, Any]]) -> str:
    header = ("", "version", "stage/run", "created", "parent", "data", "config", "val_bpb", "eval")
    rows = [header]
    for m in models:
        evals = "; ".join(e["summary"] for e in m["evals"][:2] if e["summary"])
        bpb = f"{m['val_bpb']:.4f}" if isinstance(m.get("val_bpb"), int | float) else "-"
        rows.append(
            (
                "*" if m["served"] else "",
                m["version"],
                _short(f"{m['stage']}/{m['run']}", 40),
                _short(m["created"], 20),
                _short(m["parent"], 14),
                _short(m["data_manifest_hash"], 12),
                _short(m["config_hash"], 12),
                bpb,
                _short(evals, 60),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
