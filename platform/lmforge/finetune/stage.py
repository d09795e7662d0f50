"""The `finetune` stage: supervised fine-tuning (full or LoRA) of a model artifact on chat data.

1. Resolve the base artifact (a path, a training run, or `@train/<name>`), its tokenizer and
   special tokens and chat template (its own when imported: lmforge.model.special).
2. Prepare the chat data with Ray Data into `<run>/sft_data/`: tokenized, loss-masked, packed
   Parquet shards in the trainer's format (lmforge.finetune.data); reused on resume.
3. Train with the pretraining stage's Ray Train + FSDP2 loop (lmforge.train.loop): the same
   accumulation, schedules, sharded checkpoints and automatic resume; the model starts from the
   base weights, LoRA adapters (when enabled) are the only trained and checkpointed weights.
4. The artifact `<run>/model/` is a plain model (adapters merged), with lineage pointing at the
   base (model/artifact.py), ready for eval, export and serving.
"""

from __future__ import annotations

from typing import Any

from lmforge import LmforgeError, storage
from lmforge.finetune.config import FinetuneConfig, scaffold
from lmforge.model.special import copy_special_files
from lmforge.stage import Stage, StageContext
from lmforge.train.config import check_parallel_layout
from lmforge.train.stage import check_in_process


def base_artifact(cfg: FinetuneConfig) -> str:
    """The base artifact directory; a missing or incomplete one is a one-line error."""
    from lmforge.model.artifact import TOKENIZER, resolve_artifact

    if not cfg.base:
        raise LmforgeError(
            "base is not set: give the model to fine-tune (an artifact dir, a training run dir, "
            "or @train/<run name>), e.g. --set base=@train/base"
        )
    path = resolve_artifact(cfg.base)
    if not storage.exists(storage.join(path, TOKENIZER)):  # weights and config: checked
        raise LmforgeError(
            f"base {cfg.base}: {storage.join(path, TOKENIZER)} is missing; give a model artifact "
            "(the model/ dir of a training run, or `lmforge import` output)"
        )
    return path


def validate(cfg: FinetuneConfig) -> None:
    """Before Ray starts (`Stage.validate`): the base artifact, the chat data files, the
    worker count."""
    from lmforge.finetune.data import plan_inputs

    base_artifact(cfg)
    plan_inputs(cfg.data)
    check_parallel_layout(cfg.parallel, cfg.resources.num_workers)
    check_in_process(cfg.resources)


def prepare_data(cfg: FinetuneConfig, base: str, output: str) -> tuple[str, dict[str, Any]]:
    """`<run>/sft_data/` (made once; a resumed run reuses it) and its manifest."""
    from lmforge.finetune.data import prepare_sft
    from lmforge.model.artifact import TOKENIZER, load_model_config
    from lmforge.model.special import load_special_tokens

    data_dir = storage.join(output, "sft_data")
    if not storage.is_complete(data_dir):
        seq_len = cfg.data.seq_len or load_model_config(base).max_seq_len
        prepare_sft(
            cfg.data,
            storage.read_text(storage.join(base, TOKENIZER)),
            data_dir,
            seq_len,
            special=load_special_tokens(base),
        )
    return data_dir, storage.read_json(storage.join(data_dir, "manifest.json"))


def run(cfg: FinetuneConfig, ctx: StageContext) -> dict[str, Any]:
    from lmforge.train.data import PackedShards, batch_plan
    from lmforge.train.stage import train_workers, worker_spec

    base = storage.absolute(base_artifact(cfg))
    data_dir, manifest = prepare_data(cfg, base, ctx.output)
    seq_len = PackedShards(storage.join(data_dir, "train")).seq_len
    batch_plan(
        cfg.train.global_batch_tokens,
        cfg.train.micro_batch_size,
        cfg.resources.num_workers,
        seq_len,
    )
    # The workers start from the resolved base path.
    spec = worker_spec(cfg.model_copy(update={"base": base}), ctx.output, data_dir)
    summary = train_workers(spec, cfg.resources)
    # The fine-tuned model keeps the base's special tokens and chat template.
    copy_special_files(base, storage.join(ctx.output, "model"))
    summary.update(drift_baseline(storage.join(ctx.output, "model"), base))
    summary.update(
        base=base,
        lora=cfg.lora.enabled,
        **{k: manifest[k] for k in manifest if k.startswith(("examples_", "packing_efficiency_"))},
    )
    changes = before_after(ctx.output)
    if changes:
        summary["before"] = {k: before for k, (before, _) in changes.items()}
    return summary


def drift_baseline(artifact: str, base: str) -> dict[str, Any]:
    """Give the fine-tuned artifact a `val_bpb` (serving's drift baseline) and say where it
    comes from: its own val split's target tokens (the trainer's), else its base's."""
    from lmforge.model.artifact import read_version, write_version

    record = read_version(artifact)
    if isinstance(record.get("val_bpb"), int | float):
        source = "finetune val split"
    else:
        parent = read_version(base)
        record["val_bpb"] = parent.get("val_bpb")
        source = f"parent {parent['version']}" if record["val_bpb"] is not None else None
        if source:
            print(
                f"[finetune] no validation bits per byte of its own (no val split, or data "
                f"prepared by an older lmforge): the drift baseline is its base's, {source}"
            )
    record["val_bpb_source"] = source
    write_version(artifact, **record)
    return {"val_bpb": record["val_bpb"], "val_bpb_source": source}


def before_after(output: str) -> dict[str, tuple[float, float]]:
    """Each validation score of a run before its first step (`train.eval_at_start`, step 0 of
    metrics.jsonl) and at its last validation: {"val_loss": (before, after), "eval/...": ...};
    empty when the run has no step-0 validation."""
    import json

    path = storage.join(output, "metrics.jsonl")
    if not storage.exists(path):
        return {}
    records = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    scored = [r for r in records if "val_loss" in r]
    if len(scored) < 2 or scored[0].get("step") != 0:
        return {}
    first, last = scored[0], scored[-1]
    keys = [k for k in first if k.startswith(("val_", "eval/")) and k in last]
    return {k: (first[k], last[k]) for k in keys}


STAGE = Stage(
    name="finetune",
    config_cls=FinetuneConfig,
    run=run,
    help="Fine-tune a model artifact on chat data (full or LoRA) with the pretraining loop: Ray "
    "Data prepares loss-masked packed examples, Ray Train + FSDP2 trains with checkpoints and "
    "automatic resume; the merged model artifact goes to <run>/model/.",
    input_field="base",
    scaffold=scaffold,
    validate=validate,
)
