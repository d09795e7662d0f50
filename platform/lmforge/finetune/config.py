"""The fine-tuning config: the pretraining config's loop, optimizer, checkpoint, parallel and
resources sections (the same classes, so the same loop runs it), plus the base artifact, the
chat data and LoRA. There is no `model` section: the architecture is the base artifact's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge import LmforgeError
from lmforge.config import NOT_HASHED, StrictModel, config_hash, config_yaml
from lmforge.finetune.data import SftDataConfig
from lmforge.stage import StageConfig
from lmforge.train.config import (
    GPU_LAYOUT,
    GPU_WORKERS,
    CheckpointConfig,
    LoopConfig,
    LoopSpec,
    LoraSpec,
    OptimConfig,
    ParallelConfig,
    ResourcesConfig,
)

LoraTarget = Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


class LoraConfig(StrictModel):
    enabled: bool = Field(
        False,
        description="Train low-rank adapters on the target layers instead of every weight; they are merged into the base weights in the output artifact.",
    )
    rank: int = Field(8, ge=1, description="Adapter rank r.")
    alpha: float = Field(
        16.0, gt=0, description="Adapter scale numerator: the update is (alpha / rank) * B A."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    targets: list[LoraTarget] = Field(
        default_factory=lambda: ["wq", "wk", "wv", "wo"],
        min_length=1,
        description="Linear layers to adapt: attention wq, wk, wv, wo; MLP w1 (gate), w3 (up), w2 (down).",
    )


class FinetuneOptimConfig(OptimConfig):
    lr: float = Field(
        1e-4, gt=0, description="Peak learning rate (AdamW); LoRA usually wants ~10x more."
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="Decoupled weight decay, on weight matrices only (not on norms, biases or embeddings).",
    )
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps from 0 to the peak.")


class FinetuneLoopConfig(LoopConfig):
    global_batch_tokens: int = Field(
        8192,
        ge=1,
        description="Token slots per optimizer step over all workers; must be a multiple of seq_len x micro_batch_size x num_workers (the rest is gradient accumulation). The loss is the mean over the target tokens among them.",
    )
    max_steps: int | None = Field(
        50, ge=1, description="Optimizer steps to train. None: from max_tokens."
    )
    eval_every: int = Field(
        25,
        ge=0,
        description="Steps between validation passes (and one at the end); 0: only at the end.",
    )
    eval_at_start: bool = Field(
        True,
        description="Validate the base model before the first step (step 0 in metrics.jsonl), so the run shows before/after.",
    )


class FinetuneConfig(StageConfig):
    name: str = Field(
        "finetune", description="Run name (output goes to <runs_dir>/finetune/<name>-<hash>)."
    )
    base: str | None = Field(
        None,
        description="The model to start from: an artifact dir, a training run dir, or a run reference like @train/base (the latest complete run of that name). A pipeline fills it in.",
    )
    data: SftDataConfig = Field(
        default_factory=SftDataConfig, description="The chat data, its loss mask and packing."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    optim: FinetuneOptimConfig = Field(
        default_factory=FinetuneOptimConfig, description="AdamW and the LR schedule."
    )
    train: FinetuneLoopConfig = Field(
        default_factory=FinetuneLoopConfig, description="Batch, steps, precision, logging, eval."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig,
        description="Sharded checkpoints and resume (LoRA: the adapters only).",
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description="FSDP2, activation checkpointing, compile. Not part of the config hash.",
        json_schema_extra=NOT_HASHED,
    )
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig,
        description="Ray Train workers and what each reserves. Not part of the config hash.",
        json_schema_extra=NOT_HASHED,
    )

    def loop_spec(
        self,
        output: str,
        data_dir: str | None = None,
        workers: int | None = None,
        hardware: dict | None = None,
    ) -> LoopSpec:
        """The training loop's contract: `data_dir` is the prepared SFT shards
        (finetune/data.py), `base` the artifact as given (the stage passes it resolved)."""
        if not data_dir:
            raise LmforgeError("fine-tuning trains on prepared SFT shards: give their directory")
        if not self.base:
            raise LmforgeError(
                "base is not set: give the model to fine-tune, e.g. --set base=@train/base"
            )
        lora = self.lora
        # The loop's sections are the pretraining classes: the fine-tuning subclasses differ in
        # defaults, and eval_at_start travels as its own field.
        return LoopSpec(
            output=output,
            data_dir=data_dir,
            base=self.base,
            loss="masked",
            lora=LoraSpec(**lora.model_dump(exclude={"enabled"})) if lora.enabled else None,
            eval_at_start=self.train.eval_at_start,
            workers=workers or self.resources.num_workers,
            optim=OptimConfig(**self.optim.model_dump()),
            train=LoopConfig(**self.train.model_dump(exclude={"eval_at_start"})),
            checkpoint=self.checkpoint,
            parallel=self.parallel,
            hardware=hardware,
            config_yaml=config_yaml(self),
            config_hash=config_hash(self),
        )


def scaffold(preset: str) -> dict:
    """Values `lmforge init --preset` writes into configs/finetune.yaml."""
    layout = GPU_LAYOUT.get(preset)
    if layout is None:
        return {
            "base": "@train/base",
            "lora": {"enabled": False},
            "resources": {"num_workers": 2, "gpus_per_worker": 0},
        }
    # LoRA on the pretraining layout: rows of the pretraining seq_len (not the model's longer
    # max_seq_len), 2 accumulation steps
    rows = layout["seq_len"] * layout["micro_batch_size"] * GPU_WORKERS
    return {
        "base": "@train/base",
        "data": {"seq_len": layout["seq_len"]},
        "lora": {"enabled": True},
        "train": {"global_batch_tokens": 2 * rows, "micro_batch_size": layout["micro_batch_size"]},
        "parallel": {
            "activation_checkpointing": layout["activation_checkpointing"],
            "compile": True,
        },
        "resources": {"num_workers": GPU_WORKERS, "gpus_per_worker": 1},
    }
