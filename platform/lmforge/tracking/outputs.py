"""What a finished stage run logs from its run folder, read by file name so this layer imports
no stage: the data manifest's counts, eval's report (values with their standard errors),
improve's decision, the model artifact's version and lineage, the report and the plots.

The model's weights are not copied: the run is tagged with the artifact's version id, the one
`lmforge models list` shows, and its path.
"""

from __future__ import annotations

from typing import Any

from lmforge import storage
from lmforge.tracking.base import Tracker, flatten, numeric

# Files of a run folder copied into the run's artifacts when present (PNG plots are found).
ARTIFACTS = (
    "resolved_config.yaml",
    "metrics.jsonl",
    "manifest.json",
    "report.json",
    "report.md",
    "decisions.jsonl",
    "summary.json",
)
MAX_ARTIFACT_BYTES = 64 * 2**20  # a run's records, never its weights or shards


def data_metrics(manifest: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(totals, one dict per pipeline step in order): documents in/out of each step, its drops
    by reason and its counters, so the MLflow chart over `step` is the data funnel."""
    totals = numeric(
        {
            k: v
            for k, v in manifest.items()
            if k.startswith(("documents_", "tokens_", "duplicates_", "blocks_", "bytes_"))
            or k in ("pii_redactions", "seconds")
        }
    )
    totals.update({f"rejected.{k}": float(v) for k, v in manifest.get("rejected", {}).items()})
    funnel = []
    for step in manifest.get("steps") or []:
        row = {"docs_in": float(step["docs_in"]), "docs_out": float(step["docs_out"])}
        label = step["step"]
        row.update({f"{label}.dropped.{k}": float(v) for k, v in step.get("dropped", {}).items()})
        row.update({f"{label}.{k}": float(v) for k, v in step.get("counts", {}).items()})
        funnel.append(row)
    return totals, funnel


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """`<task>.<metric>` and `<task>.<metric>.stderr` of report.json."""
    out: dict[str, float] = {}
    for task, metrics in (report.get("tasks") or {}).items():
        for name, m in metrics.items():
            if not isinstance(m, dict):
                continue
            out.update(numeric({f"{task}.{name}": m.get("value")}))
            out.update(numeric({f"{task}.{name}.stderr": m.get("stderr")}))
    return out


def log_outputs(tracker: Tracker, run_dir: str, summary: dict[str, Any]) -> None:
    """Log what `run_dir` holds after its stage returned `summary`."""
    if tracker.backend == "none":
        return
    tags = {"output": storage.absolute(run_dir)}
    manifest = _json(storage.join(run_dir, "manifest.json"))
    if manifest and "steps" in manifest:
        totals, funnel = data_metrics(manifest)
        tracker.log_metrics({f"data.{k}": v for k, v in totals.items()})
        for i, row in enumerate(funnel):
            tracker.log_metrics({f"data.{k}": v for k, v in row.items()}, step=i)
    report = _json(storage.join(run_dir, "report.json"))
    if report and "tasks" in report:
        tracker.log_metrics({f"eval.{k}": v for k, v in eval_metrics(report).items()})
    if isinstance(summary.get("action"), str):  # improve: the decision and its numbers
        tags["improve.action"] = summary["action"]
        if summary.get("reason"):
            tags["improve.reason"] = str(summary["reason"])[:500]
        tracker.log_metrics({"improve.promoted": float(summary["action"] == "promote")})
    metrics = {f"summary.{k}": v for k, v in numeric(flatten(summary)).items()}
    tracker.log_metrics(metrics)
    version = _json(storage.join(run_dir, "model", "version.json"))
    if version:
        tags["model.path"] = storage.absolute(storage.join(run_dir, "model"))
        tags.update(
            {f"model.{k}": str(v) for k, v in version.items() if v is not None and k != "created"}
        )
        _artifact(tracker, storage.join(run_dir, "model", "version.json"), "model")
    tracker.set_tags(tags)
    for name in ARTIFACTS:
        _artifact(tracker, storage.join(run_dir, name), None)
    for png in sorted(storage.list_files(run_dir, suffix=".png", recursive=False)):
        _artifact(tracker, png, "plots")


def _json(path: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(path) if storage.exists(path) else None
    except (OSError, ValueError):
        return None


def _artifact(tracker: Tracker, path: str, folder: str | None) -> None:
    if storage.exists(path) and len(storage.read_bytes(path)) <= MAX_ARTIFACT_BYTES:
        tracker.log_artifact(path, folder)
