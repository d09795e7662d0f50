"""Config of the `eval` stage."""

from __future__ import annotations

from pydantic import Field

from lmforge.config import NOT_HASHED, StrictModel
from lmforge.eval.tasks import TaskSpec
from lmforge.stage import StageConfig

DEFAULT_TASKS = [
    "builtin:stdlib-heldout-text",
    "builtin:stdlib-module-mc",
    "builtin:stdlib-docstring-gen",
    "builtin:bias-pairs",
]


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(
        32, ge=1, description="Tokens to generate at most (a task's own max_new_tokens wins)."
    )
    temperature: float = Field(
        0.0, ge=0, description="0: greedy decoding; above 0: sampling at this temperature."
    )
    top_k: int | None = Field(
        None, ge=1, description="Sampling only: keep the k most likely tokens. None: all."
    )
    seed: int = Field(
        0,
        description="Sampling seed (each item gets its own stream, so results never depend on the actor count).",
    )


class EvalResources(StrictModel):
    num_actors: int = Field(
        1,
        ge=1,
        description="Actors in the Ray Data pool; each loads the model once.",
        json_schema_extra=NOT_HASHED,
    )
    cpus_per_actor: float = Field(
        1,
        gt=0,
        description="CPUs each actor reserves (also its torch threads).",
    )
    gpus_per_actor: float = Field(
        0,
        ge=0,
        description="GPUs each actor reserves (above 0: the model runs on CUDA).",
    )


class EvalConfig(StageConfig):
    name: str = Field(
        "eval", description="Run name (output goes to <runs_dir>/eval/<name>-<hash>)."
    )
    model: str | None = Field(
        None,
        description="The model artifact directory, or a training run directory (its model/). A pipeline fills it in.",
    )
    checkpoints: list[str] = Field(
        default_factory=list,
        description="More artifacts (e.g. saved at earlier steps) evaluated the same way; with two or more models the report plots bits-per-byte over steps.",
    )
    tasks: list[str | TaskSpec] = Field(
        default_factory=lambda: list(DEFAULT_TASKS),
        description="Tasks: `builtin:NAME`, a task YAML file, or an inline task spec (see docs/evaluation.md).",
    )
    val_data: str | None = Field(
        "auto",
        description="A data stage output dir whose val/ split gets loss, perplexity and bits-per-byte (task `val`). auto: the one the model was pretrained on (its run's resolved_config.yaml data.path; for a fine-tuned model its base's), looked up under the runs dir that holds the model; if none, the report says so. None: skip.",
    )
    val_blocks: int | None = Field(
        256, ge=1, description="Evaluate at most this many val blocks. None: all."
    )
    limit: int | None = Field(
        None, ge=1, description="Items per task at most, for tasks that set no limit of their own."
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Sequences per forward pass (requests per actor call). None: 16 on CPU; on GPU as many as fit the free memory of an actor's GPU share beside the bf16 weights (the KV cache of a generation batch, the logits of a log-likelihood batch).",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Padded tokens per log-likelihood batch at most (bounds the batch x length x vocabulary logits). None: 16384 on CPU; on GPU what fits its free memory.",
    )
    max_length: int | None = Field(
        None,
        ge=2,
        description="Context length for scoring (long documents are scored in rolling windows of this size). None: the model's max_seq_len.",
    )
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="Decoding for generation tasks."
    )
    resources: EvalResources = Field(default_factory=EvalResources, description="The actor pool.")


def scaffold(preset: str) -> dict:
    """Values `lmforge init` writes into configs/eval.yaml."""
    big = preset in ("1b", "8b")
    return {
        "tasks": list(DEFAULT_TASKS),
        "resources": {"num_actors": 2, "gpus_per_actor": 1 if big else 0},
    }
