"""The pretraining config: one strict pydantic model made of small sub-configs.

Each helper takes only the sub-config it needs (`build_optimizer(cfg.optim, ...)`), so nothing
downstream sees the whole job config. The model's architecture is a plain dataclass
(`lmforge.model.LlamaConfig`); `ModelConfig.to_llama` converts.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from lmforge import LmforgeError
from lmforge.config import NOT_HASHED, StrictModel, config_hash, config_yaml
from lmforge.model.llama import LlamaConfig
from lmforge.model.presets import PRESETS, model_config
from lmforge.stage import StageConfig
from lmforge.train.layout import ParallelConfig, check_parallel_layout

PresetName = Literal["debug", "cpu", "tiny", "small", "1b", "8b"]


class ModelConfig(StrictModel):
    preset: PresetName | None = Field(
        "tiny",
        description="Model size preset (debug, cpu ~4M for minutes of CPU training, tiny ~10M, small ~125M, 1b, 8b); the fields below override it. None: the LlamaConfig defaults.",
    )
    vocab_size: int | None = Field(
        None, ge=2, description="Vocabulary size. None: the tokenizer's size, from the data."
    )
    dim: int | None = Field(None, ge=8, description="Model width D. None: the preset's.")
    n_layers: int | None = Field(None, ge=1, description="Transformer blocks. None: the preset's.")
    n_heads: int | None = Field(None, ge=1, description="Query heads. None: the preset's.")
    n_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention). None: the preset's."
    )
    ffn_dim: int | None = Field(
        None, ge=1, description="MLP hidden width (SwiGLU or ReLU-squared). None: the preset's."
    )
    max_seq_len: int | None = Field(
        None,
        ge=1,
        description="Longest sequence the model supports. None: the preset's, raised to the data's seq_len if shorter.",
    )
    rope_theta: float | None = Field(None, gt=0, description="RoPE base. None: the preset's.")
    tie_embeddings: bool | None = Field(
        None, description="Share the input embedding with the output head. None: the preset's."
    )
    mlp: Literal["swiglu", "relu2"] | None = Field(
        None,
        description="MLP kind: swiglu (w2(silu(w1 x) * w3 x)) or relu2 (w2(relu(w1 x)^2), two matrices; give it a wider ffn_dim for the same parameters). None: the preset's.",
    )
    qk_norm: bool | None = Field(
        None, description="RMSNorm on each head's queries and keys before RoPE. None: the preset's."
    )
    zero_init_out: bool | None = Field(
        None,
        description="Initialise the attention and MLP output projections (wo, w2) to zero. None: the preset's.",
    )
    logit_softcap: float | None = Field(
        None, gt=0, description="Soft-cap the logits: cap * tanh(logits / cap). None: no cap."
    )

    def to_llama(self, vocab_size: int | None = None, seq_len: int | None = None) -> LlamaConfig:
        """The architecture; `vocab_size`/`seq_len` from the data fill what the config leaves open."""
        fields = self.model_dump(exclude={"preset"})
        fields["vocab_size"] = fields["vocab_size"] or vocab_size
        cfg = model_config(self.preset, **fields)
        if self.max_seq_len is None and seq_len and seq_len > cfg.max_seq_len:
            cfg.max_seq_len = seq_len
        return cfg

    @model_validator(mode="after")
    def _valid_shape(self) -> ModelConfig:
        try:
            self.to_llama()
        except ValueError as e:
            raise ValueError(str(e)) from None
        return self


class TrainDataConfig(StrictModel):
    """Where the packed token shards are (not the data stage's config: lmforge.data.config)."""

    path: str | None = Field(
        None,
        description="The data stage's output directory (train/, val/, tokenizer.json, manifest.json). A pipeline fills it in.",
    )
    shuffle: bool = Field(
        True, description="Visit the training row groups in a new seeded order each epoch."
    )


class OptimConfig(StrictModel):
    name: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw: AdamW on every weight. muon: Muon (orthogonalised momentum) on the blocks' 2-D weight matrices, AdamW (lr, betas, eps) on embeddings, head and norms; one worker or unsharded weights only (fsdp off).",
    )
    muon_lr: float = Field(
        0.02,
        gt=0,
        description="muon only: peak learning rate of the Muon matrices (scaled by sqrt(max(1, rows/cols)) per matrix); follows the same schedule as lr.",
    )
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon only: Nesterov momentum.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW beta1, beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(
        0.1,
        ge=0,
        description="Decoupled weight decay, on weight matrices only (not on norms, biases or embeddings).",
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this value. None: no clipping."
    )
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine",
        description="Learning-rate schedule after warmup: cosine decay, WSD (warmup-stable-decay: constant, then a linear decay over the last decay_fraction), or constant.",
    )
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps from 0 to the peak.")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="WSD only: the fraction of steps spent decaying at the end."
    )


class LoopConfig(StrictModel):
    global_batch_tokens: int = Field(
        16384,
        ge=1,
        description="Tokens per optimizer step over all workers; must be a multiple of seq_len x micro_batch_size x num_workers (the rest is gradient accumulation).",
    )
    micro_batch_size: int = Field(
        4, ge=1, description="Sequences per worker per forward/backward pass."
    )
    max_steps: int | None = Field(
        100, ge=1, description="Optimizer steps to train. None: from max_tokens."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Token budget, used when max_steps is None."
    )
    seed: int = Field(0, description="Seed of the weight init and the data order.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 on GPUs; on CPU bf16 only where its matmuls measure faster than fp32 (a native kernel such as AMX), else fp32; the training log says which and why. bf16: bf16 compute with fp32 master weights (autocast on CPU; FSDP2 MixedPrecisionPolicy, bf16 params and fp32 reduce, on GPU). fp32: everything fp32.",
    )
    log_every: int = Field(
        10, ge=1, description="Steps between metric lines (metrics.jsonl, Ray Train report)."
    )
    eval_every: int = Field(
        50,
        ge=0,
        description="Steps between validation passes (and one at the end); 0: only at the end.",
    )
    eval_sequences: int = Field(
        64,
        ge=1,
        description="Validation sequences per pass (the first ones of val/, split over the workers; the same set at any worker count).",
    )
    eval_tasks: list[str] = Field(
        default_factory=list,
        description="Evaluation tasks (named as in `lmforge eval`, e.g. builtin:stdlib-module-mc or a task file) scored at every validation pass; results go to metrics.jsonl as eval/<task>/<metric>.",
    )
    eval_task_limit: int = Field(
        32, ge=1, description="Items per task in each of those passes (the first ones of the task)."
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak TFLOP/s per device for MFU. None: a table by GPU name, or on CPU a square-matmul probe in the training dtype and the worker's thread count, run once per node and cached by CPU model in $LMFORGE_HOME/cpu_peak.json.",
        json_schema_extra=NOT_HASHED,
    )
    fault_at_step: int | None = Field(
        None,
        ge=1,
        description="Testing fault tolerance: the last worker crashes once when it reaches this step.",
    )


class CheckpointConfig(StrictModel):
    every_steps: int = Field(
        50,
        ge=0,
        description="Steps between sharded checkpoints; 0: none during the run (see at_end).",
    )
    at_end: bool = Field(
        False,
        description="Also checkpoint the last step: only to continue training past it, since the "
        "model artifact is written from the same state and a finished run is never resumed.",
    )
    keep_last: int = Field(2, ge=1, description="Keep the newest K checkpoints.")
    resume: bool = Field(
        True,
        description="Continue from the newest complete checkpoint in this run's output when there is one.",
    )


class ResourcesConfig(StrictModel):
    num_workers: int = Field(
        2, ge=1, description="Ray Train workers (one per GPU on GPU clusters)."
    )
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker reserves.")
    gpus_per_worker: float = Field(
        0,
        ge=0,
        description="GPUs each worker reserves: 0 (train on CPU) or 1 (one worker per GPU; more GPUs: more workers).",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers across nodes."
    )
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type the workers need (e.g. H100); also the GPU that `lmforge plan` assumes.",
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="Worker-group restarts from the last checkpoint before giving up (-1: unlimited).",
    )
    in_process: bool = Field(
        False,
        description="Train in the `lmforge` process itself instead of on Ray Train workers (like Ray Train's local mode, num_workers=0): no Ray processes start for training, so the first step comes seconds after the command rather than after Ray Train's worker group is up. One worker only (num_workers: 1) with cpus_per_worker threads, or one GPU with gpus_per_worker: 1; no restarts (max_failures does not apply: rerun the command to resume from the last checkpoint). For quick runs on one machine.",
    )

    @property
    def threads_per_worker(self) -> int:
        """The torch threads of one worker: its whole CPUs (at least one), as Ray gives it."""
        return max(1, int(self.cpus_per_worker))

    @model_validator(mode="after")
    def _one_gpu_per_worker(self) -> ResourcesConfig:
        # Each worker drives exactly one device (FSDP2 shards across workers): a fraction would
        # share a GPU between workers, several would leave all but one idle.
        if self.gpus_per_worker not in (0, 1):
            raise ValueError(
                f"resources.gpus_per_worker={self.gpus_per_worker:g}: each worker trains on one "
                f"GPU; set gpus_per_worker: 1 and num_workers to the number of GPUs "
                f"(e.g. {max(1, round(self.num_workers * self.gpus_per_worker))}), or 0 for CPU"
            )
        if self.in_process and self.num_workers != 1:
            raise ValueError(
                f"resources.in_process=true trains in one process, not {self.num_workers} workers: "
                f"set resources.num_workers=1, or in_process=false to train on Ray Train workers"
            )
        return self


class PlanConfig(StrictModel):
    assumed_mfu: float = Field(
        0.4, gt=0, le=1, description="Model FLOPs utilisation `lmforge plan` assumes for wall time."
    )
    gpu_type: str = Field(
        "H100",
        description="GPU assumed by `lmforge plan` when resources.accelerator_type is unset.",
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory per GPU for the fit check. None: from the GPU table."
    )


class TrainConfig(StageConfig):
    name: str = Field(
        "pretrain", description="Run name (output goes to <runs_dir>/train/<name>-<hash>)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model architecture.")
    data: TrainDataConfig = Field(
        default_factory=TrainDataConfig, description="The packed token shards."
    )
    optim: OptimConfig = Field(
        default_factory=OptimConfig, description="AdamW and the LR schedule."
    )
    train: LoopConfig = Field(
        default_factory=LoopConfig, description="Batch, steps, precision, logging, eval."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Sharded checkpoints and resume."
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description="FSDP2, tensor/pipeline/context parallel degrees, activation checkpointing, compile. How to run, not what: not part of the config hash.",
        json_schema_extra=NOT_HASHED,
    )
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig,
        description="Ray Train workers and what each reserves. Not part of the config hash: the global batch and data order do not depend on it, so a run resumes on a different worker count.",
        json_schema_extra=NOT_HASHED,
    )
    plan: PlanConfig = Field(
        default_factory=PlanConfig,
        description="Assumptions of `lmforge plan` (not part of the config hash).",
        json_schema_extra=NOT_HASHED,
    )

    def loop_spec(
        self,
        output: str,
        data_dir: str | None = None,
        workers: int | None = None,
        hardware: dict[str, Any] | None = None,
    ) -> LoopSpec:
        """The training loop's contract for this config (`data_dir`: else `data.path`;
        `workers`: else `resources.num_workers`)."""
        data_dir = data_dir or self.data.path
        if not data_dir:
            raise LmforgeError(
                "data.path is not set: give the data stage's output, e.g. --set data.path=@data/<name>"
            )
        return LoopSpec(
            output=output,
            data_dir=data_dir,
            model=self.model,
            loss="next_token",
            shuffle=self.data.shuffle,
            workers=workers or self.resources.num_workers,
            optim=self.optim,
            train=self.train,
            checkpoint=self.checkpoint,
            parallel=self.parallel,
            hardware=hardware,
            config_yaml=config_yaml(self),
            config_hash=config_hash(self),
        )


# ---------------------------------------------------------------- the loop's contract


class LoraSpec(StrictModel):
    """Low-rank adapters to train instead of every weight (merged into the exported model)."""

    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    targets: list[str] = Field(min_length=1)


class LoopSpec(StrictModel):
    """Everything a training worker runs from: built once on the driver from a stage config
    (`TrainConfig.loop_spec`, `FinetuneConfig.loop_spec`), sent to each Ray Train worker as
    plain data and validated back into this class there. The loop reads nothing else."""

    output: str = Field(description="The run directory (checkpoints, metrics, model/).")
    data_dir: str = Field(description="Packed shards: train/, val/, tokenizer.json, manifest.")
    model: ModelConfig | None = Field(
        None, description="Pretraining: the architecture, sized by the data's vocab and seq_len."
    )
    base: str | None = Field(
        None, description="Fine-tuning: the artifact whose architecture and weights start the run."
    )
    loss: Literal["next_token", "masked"] = Field(
        description="next_token: every token of the packed rows; masked: the loss-masked target "
        "tokens only, packed documents kept apart (fine-tuning shards)."
    )
    shuffle: bool = True
    lora: LoraSpec | None = None
    eval_at_start: bool = Field(False, description="Validate before the first step (step 0).")
    workers: int = Field(ge=1, description="Training workers the layout is for.")
    optim: OptimConfig
    train: LoopConfig
    checkpoint: CheckpointConfig
    parallel: ParallelConfig
    hardware: dict[str, Any] | None = Field(
        None,
        description="The driver's precision and peak (train/hardware.py); None: each worker's.",
    )
    config_yaml: str = Field(description="The stage config, saved with the model artifact.")
    config_hash: str = Field(description="Its hash, for the artifact's lineage.")

    @model_validator(mode="after")
    def _consistent(self) -> LoopSpec:
        if (self.model is None) == (self.base is None):
            raise ValueError("give exactly one of model (pretraining) and base (fine-tuning)")
        check_parallel_layout(self.parallel, self.workers)
        return self

    @property
    def stage(self) -> str:
        return "finetune" if self.base else "train"


class SpecSource(Protocol):
    """A stage config the loop runs (TrainConfig; FinetuneConfig builds on these sections)."""

    train: LoopConfig
    resources: ResourcesConfig

    def loop_spec(
        self,
        output: str,
        data_dir: str | None = None,
        workers: int | None = None,
        hardware: dict[str, Any] | None = None,
    ) -> LoopSpec: ...


# The GPU presets' layout on 8 x 80 GiB GPUs at the data scaffold's seq_len (1b: 2048, 8b: 4096),
# chosen by `lmforge plan` (tests/train/test_plan_memory.py): the 1b fits without recomputing
# activations (the faster choice); the 8b needs activation checkpointing and 2 sequences per
# micro-batch (~35 GiB per GPU; 4 sequences without checkpointing would need ~161 GiB).
GPU_LAYOUT = {
    "1b": {"seq_len": 2048, "micro_batch_size": 4, "activation_checkpointing": False},
    "8b": {"seq_len": 4096, "micro_batch_size": 2, "activation_checkpointing": True},
}
GPU_WORKERS = 8


def scaffold(preset: str) -> dict:
    """Values `lmforge init --preset` writes into configs/train.yaml."""
    layout = GPU_LAYOUT.get(preset)
    if layout is None:
        return {
            "model": {"preset": preset if preset in PRESETS else "tiny"},
            "train": {"global_batch_tokens": 16384, "micro_batch_size": 4},
            "resources": {"num_workers": 2, "gpus_per_worker": 0},
        }
    return {
        "model": {"preset": preset},
        # 524288 tokens per step: 8 accumulation steps at either preset's layout
        "train": {"global_batch_tokens": 524288, "micro_batch_size": layout["micro_batch_size"]},
        "parallel": {
            "activation_checkpointing": layout["activation_checkpointing"],
            "compile": True,
        },
        "resources": {"num_workers": GPU_WORKERS, "gpus_per_worker": 1},
        "plan": {"gpu_type": "H100"},
    }
