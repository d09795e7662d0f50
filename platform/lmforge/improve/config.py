"""Config of `lmforge improve`: where the feedback is, how it becomes training data, how the
candidate is fine-tuned and evaluated, and what the gate allows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config import NOT_HASHED, StrictModel
from lmforge.eval.tasks import TaskSpec
from lmforge.finetune.config import FinetuneLoopConfig, FinetuneOptimConfig, LoraConfig
from lmforge.stage import StageConfig
from lmforge.train.config import ResourcesConfig


class FeedbackDataConfig(StrictModel):
    since: str | None = Field(
        None,
        description="Use feedback from this time on: ISO time or a duration back from now (24h, 7d). None: since the previous run's cut-off (all feedback on the first run).",
    )
    min_rating: float = Field(
        0.5,
        ge=-1,
        le=1,
        description="A completion rated at least this (ratings are -1..1) becomes a training answer as it was given.",
    )
    use_corrections: bool = Field(
        True,
        description="A correction (the answer the user wanted) becomes the training answer, whatever the rating.",
    )
    keys: Literal["trusted", "all"] = Field(
        "trusted",
        description="Whose feedback is used: `trusted` (sent with a key in the serving config's trusted_keys; rows without the mark are skipped) or `all` (any key, e.g. a closed beta).",
    )
    exclude_keys: list[str] = Field(
        default_factory=list,
        description="Key ids (the feedback rows' key_id) whose feedback is never used, whatever `keys` says.",
    )
    min_examples: int = Field(
        8,
        ge=1,
        description="Fewer usable examples than this: no fine-tuning this run (recorded as a skip).",
    )
    decontaminate_ngram: int = Field(
        8,
        ge=3,
        description="Drop an example sharing a word n-gram of this length with any gate task item (so a candidate cannot be trained on the questions it is judged by).",
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of the feedback examples held out as the run's val split.",
    )


class FinetuneSettings(StrictModel):
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    optim: FinetuneOptimConfig = Field(
        default_factory=FinetuneOptimConfig, description="AdamW and the LR schedule."
    )
    train: FinetuneLoopConfig = Field(
        default_factory=lambda: FinetuneLoopConfig(eval_at_start=False),
        description="Batch, steps, precision (the fine-tuning loop's section).",
    )
    seq_len: int | None = Field(
        None, ge=8, description="Row length of the SFT data. None: the served model's max_seq_len."
    )
    truncate: Literal["drop", "truncate"] = Field(
        "truncate",
        description="A feedback conversation longer than seq_len + 1 tokens: keep its first seq_len + 1 tokens, or drop it (counted in the SFT manifest).",
    )
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig,
        description="Ray Train workers for the fine-tune. Not part of the config hash.",
        json_schema_extra=NOT_HASHED,
    )


class GateConfig(StrictModel):
    tasks: list[str | TaskSpec] = Field(
        default_factory=lambda: ["builtin:stdlib-qa", "builtin:stdlib-heldout-text"],
        description="Eval tasks both models are scored on (`lmforge eval` task names, files or inline specs).",
    )
    limit: int | None = Field(
        64, ge=1, description="Items per task at most (the same items for both models)."
    )
    metrics: list[str] = Field(
        default_factory=list,
        description="Gated metrics as TASK/METRIC[=MAX] (as `lmforge eval compare --metric`). Empty: every metric with a known direction.",
    )
    max_regression: float = Field(
        0.0,
        ge=0,
        description="How much worse than the served model a gated metric may be (absolute, in the metric's units).",
    )
    sigmas: float = Field(
        0.0,
        ge=0,
        description="Also allow this many combined standard errors of the two scores (sampling noise).",
    )
    require_improvement: bool = Field(
        True,
        description="Promote only when at least one gated metric is strictly better (an equal candidate is not worth a new version).",
    )
    num_actors: int = Field(
        1, ge=1, description="Eval actors per model.", json_schema_extra=NOT_HASHED
    )


class ImproveConfig(StageConfig):
    name: str = Field(
        "improve",
        description="Loop name: its state and decisions live in <runs_dir>/improve/<name>-<hash>/.",
    )
    request_log: str | None = Field(
        None,
        description="The serving app's request log (its `request_log.path`): requests/ and feedback/ Parquet. Required.",
    )
    current: str | None = Field(
        None,
        description="The served model when the loop first runs (artifact dir, run dir or @stage/name); it is adopted into the serving pointer <runs_dir>/serving/current.json, which promotions move and which wins from then on.",
    )
    serve_name: str = Field(
        "lmforge", description="Model name clients use, in the serving config written on promotion."
    )
    feedback: FeedbackDataConfig = Field(
        default_factory=FeedbackDataConfig, description="Which feedback becomes training data."
    )
    finetune: FinetuneSettings = Field(
        default_factory=FinetuneSettings, description="How the candidate is fine-tuned."
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="Candidate vs current.")
