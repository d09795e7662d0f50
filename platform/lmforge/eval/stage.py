"""The `eval` stage: score a model artifact on tasks with a Ray Data actor pool, write reports.

Everything that can fail on the user's side (the model path, task files, the val split) is
resolved before any actor starts. Malformed task lines are reported and skipped. Then, per
model, all requests of all tasks go through one actor pool, and the metrics, `report.json`,
`report.md`, `samples/<task>.jsonl` and (with several checkpoints) a plot are written.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from lmforge import ConfigError, storage
from lmforge.eval.config import EvalConfig, scaffold
from lmforge.eval.report import plot_over_steps, text_table, write_report
from lmforge.eval.tasks import Items, TaskSpec, load_items, resolve_task
from lmforge.model.artifact import RESOLVED, TOKENIZER, resolve_artifact
from lmforge.model.special import LMFORGE, SpecialTokens, load_special_tokens
from lmforge.stage import Stage, StageContext


def artifact_step(artifact: str, index: int) -> int:
    """The training step an artifact was saved at, if anything says so; else its position."""
    parent = artifact.rstrip("/").rsplit("/", 1)[0]
    summary = storage.join(parent, "train_summary.json")
    if storage.exists(summary):
        data = json.loads(storage.read_text(summary))
        for key in ("step", "steps", "total_steps"):
            if isinstance(data.get(key), int):
                return data[key]
    match = re.search(r"step[-_]?(\d+)", artifact)
    return int(match.group(1)) if match else index


@dataclass
class Task:
    spec: TaskSpec
    items: Items
    bytes_per_token: float | None = None


def trained_on(artifact: str, depth: int = 4) -> str | None:
    """The data stage output a model was pretrained on: `data.path` of the run that made it,
    or of its base for a fine-tuned model (which keeps the base's tokenizer). Both were
    written as the run saw them (relative to its working directory, or absolute), so they are
    looked up under the runs dir that holds the artifact, as a moved runs dir needs."""
    resolved = storage.join(artifact, RESOLVED)
    if depth == 0 or not storage.exists(resolved):
        return None
    run_cfg = yaml.safe_load(storage.read_text(resolved)) or {}
    data = (run_cfg.get("data") or {}).get("path")
    # <runs_dir>/<stage>/<run>/model: the runs dir this artifact was written under
    runs_dir = artifact.rstrip("/").rsplit("/", 3)[0] if "/" in artifact else artifact
    if data:
        return storage.find_under(runs_dir, data)
    base = run_cfg.get("base")
    if not isinstance(base, str) or base.startswith("@") or "/@" in base:
        return None  # fine-tune configs store the resolved base; a reference is not one
    base = storage.find_under(runs_dir, base)
    if not storage.exists(storage.join(base, RESOLVED)):
        base = storage.join(base, "model")  # a training run dir
    return trained_on(base, depth - 1)


def val_task(cfg: EvalConfig, artifact: str) -> Task | None:
    """Task `val`: the packed val blocks of the data the model was trained on (or `val_data`)."""
    data = trained_on(artifact) if cfg.val_data == "auto" else cfg.val_data
    if not data:
        if cfg.val_data == "auto":
            print(f"[eval] val: {artifact} names no training data; skipped", flush=True)
        return None
    manifest_path = storage.join(data, "manifest.json")
    if not storage.exists(manifest_path):
        if cfg.val_data == "auto":
            print(f"[eval] val: no data stage output at {data} (trained on); skipped", flush=True)
            return None
        raise ConfigError(f"val_data: no data stage output at {data} (manifest.json missing)")
    manifest = json.loads(storage.read_text(manifest_path))
    spec = TaskSpec(name="val", type="perplexity", file=storage.join(data, "val"))
    spec = spec.model_copy(
        update={"metrics": ["loss", "perplexity", "bits_per_byte", "byte_perplexity"]}
    )
    items = Items()
    tok_sha = manifest.get("tokenizer_sha256")
    from lmforge.data.tokenizer import sha256_text

    if tok_sha and tok_sha != sha256_text(storage.read_text(storage.join(artifact, TOKENIZER))):
        items.problems.append(
            f"{data}: the val split was tokenized with another tokenizer; skipped"
        )
        return Task(spec, items)
    items.rows = [{"tokens": b} for b in read_blocks(storage.join(data, "val"), cfg.val_blocks)]
    items.lines = list(range(1, len(items.rows) + 1))
    tokens, n_bytes = manifest.get("tokens_val"), manifest.get("bytes_val")
    per_token = n_bytes / tokens if tokens and n_bytes else None
    if per_token is None:
        spec = spec.model_copy(update={"metrics": ["loss", "perplexity"]})
    return Task(spec, items, per_token)


def read_blocks(directory: str, limit: int | None) -> list[list[int]]:
    """The first `limit` packed blocks of a split, in file order, reading no further."""
    import pyarrow.parquet as pq

    blocks: list[list[int]] = []
    for path in storage.list_files(directory, suffix=".parquet"):
        fs, inner = storage.resolve(path)
        for batch in pq.ParquetFile(fs.open_input_file(inner)).iter_batches(
            batch_size=256, columns=["tokens"]
        ):
            blocks += batch.column(0).to_pylist()
            if limit is not None and len(blocks) >= limit:
                return blocks[:limit]
    return blocks


def load_tasks(cfg: EvalConfig) -> list[Task]:
    tasks = []
    for ref in cfg.tasks:
        spec = resolve_task(ref)
        if spec.limit is None and cfg.limit is not None:
            spec = spec.model_copy(update={"limit": cfg.limit})
        tasks.append(Task(spec, load_items(spec)))
    names = [t.spec.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"tasks: names must be unique, repeated: {', '.join(dupes)}")
    return tasks


def score_tasks(
    tasks: list[Task],
    tokenizer,
    max_length: int,
    generation: dict[str, Any],
    score: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    output: str | None = None,
    special: SpecialTokens = LMFORGE,
) -> dict[str, dict[str, Any]]:
    """task -> metric -> {value, stderr, n}: every task's requests through `score` in one go;
    per-item samples go to `output`/samples/<task>.jsonl when `output` is given. Contexts start
    with the model's `special.prefix_id` (lmforge.model.special)."""
    from lmforge.eval.scoring import build_requests, task_metrics

    per_task = [
        build_requests(t.spec, t.items, tokenizer, max_length, generation, special) for t in tasks
    ]
    results = score([r for reqs in per_task for r in reqs])
    report: dict[str, dict[str, Any]] = {}
    start = 0
    for task, reqs in zip(tasks, per_task, strict=True):
        part = results[start : start + len(reqs)]
        start += len(reqs)
        metrics, samples = task_metrics(task.spec, task.items, reqs, part, task.bytes_per_token)
        report[task.spec.name] = {k: m.to_dict() for k, m in metrics.items()}
        if output is not None:
            lines = "".join(json.dumps(s) + "\n" for s in samples)
            storage.write_text(storage.join(output, "samples", f"{task.spec.name}.jsonl"), lines)
    return report


def evaluate_model(cfg: EvalConfig, artifact: str, tasks: list[Task], output: str | None):
    """One artifact through a Ray Data actor pool (see `score_tasks`)."""
    from tokenizers import Tokenizer

    from lmforge.eval.runner import score_distributed
    from lmforge.model.artifact import load_model_config

    tokenizer = Tokenizer.from_str(storage.read_text(storage.join(artifact, TOKENIZER)))
    special = load_special_tokens(artifact, tokenizer)
    max_length = min(cfg.max_length or 1 << 30, load_model_config(artifact).max_seq_len)
    res = cfg.resources

    def score(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        print(f"[eval] {artifact}: {len(requests)} requests over {len(tasks)} task(s)", flush=True)
        return score_distributed(
            artifact,
            requests,
            cfg.batch_size,
            res.num_actors,
            res.cpus_per_actor,
            res.gpus_per_actor,
            max_length,
            cfg.max_batch_tokens,
        )

    generation = cfg.generation.model_dump()
    return score_tasks(tasks, tokenizer, max_length, generation, score, output, special)


def evaluate_in_process(
    model,
    tokenizer,
    tasks: list[str | TaskSpec],
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> dict[str, dict[str, float]]:
    """task -> metric -> value of a model already in memory, in this process, no Ray: for a
    training loop that evaluates its checkpoints (rank 0, `model.eval()` under no_grad)."""
    from lmforge.eval.config import GenerationConfig
    from lmforge.eval.lm import Scorer
    from lmforge.eval.runner import score_local

    specs = [resolve_task(t) for t in tasks]
    loaded = [
        Task(spec, load_items(spec.model_copy(update={"limit": spec.limit or limit})))
        for spec in specs
    ]
    scorer = Scorer(model, tokenizer, device=str(next(model.parameters()).device))
    gen = GenerationConfig(max_new_tokens=max_new_tokens).model_dump()
    report = score_tasks(
        [t for t in loaded if t.items.rows],
        tokenizer,
        scorer.max_length,
        gen,
        lambda requests: score_local(scorer, requests, batch_size),
    )
    return {t: {m: v["value"] for m, v in ms.items()} for t, ms in report.items()}


def validate(cfg: EvalConfig) -> None:
    """Before Ray starts (`Stage.validate`): the models and where each task comes from (a
    task's items are read, and bad lines reported, when it runs)."""
    if not cfg.model:
        raise ConfigError("model: give the model artifact or training run directory to evaluate")
    for model in [cfg.model, *cfg.checkpoints]:
        resolve_artifact(model)
    for ref in cfg.tasks:
        resolve_task(ref)
    explicit_val = cfg.val_data not in (None, "auto")
    if explicit_val and not storage.exists(storage.join(cfg.val_data, "manifest.json")):
        raise ConfigError(
            f"val_data: no data stage output at {cfg.val_data} (manifest.json missing)"
        )


def run(cfg: EvalConfig, ctx: StageContext) -> dict[str, Any]:
    # absolute: the scoring actors run in another working directory
    models = [storage.absolute(resolve_artifact(m)) for m in [cfg.model, *cfg.checkpoints]]
    tasks = load_tasks(cfg)
    vals = [val_task(cfg, artifact) for artifact in models]  # checked before any actor starts
    problems = {t.spec.name: t.items.problems for t in [*vals[:1], *tasks] if t is not None}
    for name, found in problems.items():
        for p in found[:5]:
            print(f"[eval] {name}: skipped {p}", file=sys.stderr, flush=True)
        if len(found) > 5:
            print(f"[eval] {name}: ... {len(found) - 5} more skipped", file=sys.stderr)
    checkpoints = []
    for i, (artifact, val) in enumerate(zip(models, vals, strict=True)):
        model_tasks = list(tasks) if val is None else [val, *tasks]
        out = ctx.output if i == 0 else storage.join(ctx.output, "checkpoints", str(i))
        empty = [t.spec.name for t in model_tasks if not t.items.rows]
        if empty:
            print(f"[eval] no valid items, left out of the report: {', '.join(empty)}", flush=True)
        results = evaluate_model(cfg, artifact, [t for t in model_tasks if t.items.rows], out)
        checkpoints.append(
            {"model": artifact, "step": artifact_step(artifact, i), "tasks": results}
        )
    report = {
        "model": models[0],
        "tasks": checkpoints[0]["tasks"],
        "problems": problems,
        "checkpoints": checkpoints if len(checkpoints) > 1 else [],
    }
    report["plot"] = plot_over_steps(ctx.output, checkpoints) if len(checkpoints) > 1 else None
    write_report(ctx.output, report)
    print(f"\n[eval] {models[0]}\n" + text_table(report["tasks"]), flush=True)
    return {
        "report": storage.join(ctx.output, "report.json"),
        "tasks": {t: {m: v["value"] for m, v in ms.items()} for t, ms in report["tasks"].items()},
        "skipped_items": sum(len(p) for p in problems.values()),
    }


STAGE = Stage(
    name="eval",
    config_cls=EvalConfig,
    run=run,
    help="Evaluate a model artifact with a Ray Data actor pool: loss, perplexity and "
    "bits-per-byte, multiple-choice, generation, classification and bias-probe tasks; "
    "writes report.json / report.md. `lmforge eval compare BASELINE CANDIDATE "
    "--max-regression X` is the promotion gate.",
    input_field="model",
    scaffold=scaffold,
    validate=validate,
)
