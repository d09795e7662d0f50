"""One worker's view of a training run: where it runs (`WorkerEnv`) and what it trains (`Run`,
set up from the driver's `LoopSpec`: data, architecture, batch plan, budget, precision, flops).

No Ray import at module level: `run_local` and the benchmarks train in one plain process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lmforge import LmforgeError, storage
from lmforge.model.artifact import load_model_config
from lmforge.model.llama import LlamaConfig
from lmforge.train.config import LoopSpec, LoraSpec
from lmforge.train.context_parallel import check_context_parallel
from lmforge.train.data import BatchPlan, PackedShards, batch_plan, read_manifest, tokens_per_byte
from lmforge.train.hardware import for_worker
from lmforge.train.layout import (
    ParallelDims,
    check_parallel_layout,
    check_placement,
    check_tensor_parallel_use,
    parallel_dims,
)
from lmforge.train.mfu import training_flops_per_token


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    device: torch.device
    in_ray: bool
    # None: every rank on one node (plain FSDP, not HSDP). Ray Train and torchrun number ranks
    # node by node, so with whole nodes the mesh's inner (tp) groups never span two.
    ranks_per_node: int | None = None
    node: str = ""  # which machine (Ray's node id; the host name outside Ray): layout.json

    def __post_init__(self) -> None:
        if not self.node:
            import socket

            self.node = socket.gethostname()

    @classmethod
    def from_ray(cls) -> WorkerEnv:
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives and object broadcasts use it
        return cls(
            ctx.get_world_rank(),
            ctx.get_world_size(),
            device,
            in_ray=True,
            ranks_per_node=ctx.get_local_world_size(),
            node=ray.get_runtime_context().get_node_id(),
        )


@dataclass(kw_only=True)
class Run:
    """What the loop needs besides model and optimizer: the spec, data, shapes, budget, flops."""

    spec: LoopSpec
    arch: LlamaConfig
    dims: ParallelDims  # the layout: tp, cp, pp as configured, data parallel the rest
    dp_rank: int  # which data-parallel slice of each batch this worker reads
    mesh: object = None  # the DeviceMesh once `device_mesh` built it (context parallel reads it)
    train: PackedShards
    val: PackedShards | None
    plan: BatchPlan
    total_steps: int
    bf16: bool
    precision_reason: str
    flops_per_token: float
    peak_tflops: float
    peak_source: str
    val_tokens_per_byte: float | None  # None: no val split (no bits per byte)
    tokenizer_json: str | None

    @property
    def lora(self) -> LoraSpec | None:
        return self.spec.lora

    @property
    def masked(self) -> bool:
        """Loss on the masked-in target tokens only (fine-tuning), else on every next token."""
        return self.spec.loss == "masked"

    @property
    def reduce_every_micro_batch(self) -> bool:
        """FSDP2 reduce-scatters each micro-batch's gradients (only the shard is kept between
        micro-steps), rather than once per step from a full unsharded gradient."""
        return self.spec.parallel.grad_reduce == "every_micro_batch"

    def device_mesh(self, env: WorkerEnv, fsdp_on_one: bool = False):
        """The worker's DeviceMesh (layout.MESH_DIMS), built once by the loop; None in a plain
        single process (`fsdp_on_one`: a mesh of one, so one GPU runs the multi-GPU path)."""
        if env.world_size == 1 and not fsdp_on_one:
            return None
        import torch.distributed as dist

        if not dist.is_initialized():
            raise LmforgeError("a device mesh needs a process group: none is initialised")
        self.mesh = self.dims.build_mesh(env.device.type)
        self.record_layout(env)
        return self.mesh

    def record_layout(self, env: WorkerEnv) -> dict:
        """Where each rank runs and its mesh coordinates, gathered to rank 0 and written to
        `<run>/layout.json` (a collective): whether every tensor-parallel group shares a node."""
        import torch.distributed as dist

        nodes: list[str] = [""] * env.world_size
        dist.all_gather_object(nodes, env.node)
        ranks = [
            {"rank": r, "node": node, "coords": self.dims.coords(r)} for r, node in enumerate(nodes)
        ]
        tp_nodes: dict[int, set[str]] = {}
        for r in ranks:  # a tp group: the ranks that agree on every coordinate but tp
            tp_nodes.setdefault(r["rank"] // self.dims.tp, set()).add(r["node"])
        layout = {
            "dims": dataclasses.asdict(self.dims),
            "tp_groups_within_nodes": all(len(n) == 1 for n in tp_nodes.values()),
            "ranks": ranks,
        }
        if env.rank == 0:
            storage.write_json(storage.join(self.spec.output, "layout.json"), layout)
        return layout

    @property
    def adapt(self) -> Callable[[torch.nn.Module], None] | None:
        """What to do to the bare model before parallelising it: add LoRA adapters, or nothing."""
        lora = self.spec.lora
        if lora is None:
            return None
        from lmforge.model.lora import apply_lora

        return lambda model: apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)


def setup_run(spec: LoopSpec, env: WorkerEnv) -> Run:
    """The run on this worker; the spec's `hardware` is the driver's precision and peak
    (`lmforge.train.hardware`), None: decided here."""
    if env.world_size != spec.workers:
        raise LmforgeError(
            f"the loop spec is for {spec.workers} worker(s) but {env.world_size} are running"
        )
    data = spec.data_dir
    manifest = read_manifest(data)
    train = PackedShards(storage.join(data, "train"), spec.train.seed, spec.shuffle)
    if train.masked != (spec.loss == "masked"):
        raise LmforgeError(
            f"{data}: {'loss-masked SFT' if train.masked else 'plain token'} shards, but this "
            f"run's loss is {spec.loss}: pretrain on the data stage's output, fine-tune on "
            "finetune's sft_data"
        )
    val_dir = storage.join(data, "val")
    val = PackedShards(val_dir) if storage.list_files(val_dir, suffix=".parquet") else None
    vocab = int(manifest.get("vocab_size") or 0) or None
    if spec.base:  # fine-tuning: the architecture is the base artifact's
        arch = load_model_config(spec.base)
        if arch.max_seq_len < train.seq_len:
            raise LmforgeError(
                f"data seq_len {train.seq_len} is longer than the base model's max_seq_len "
                f"{arch.max_seq_len}: lower data.seq_len"
            )
    else:
        assert spec.model is not None  # LoopSpec: exactly one of base and model
        arch = spec.model.to_llama(vocab_size=vocab, seq_len=train.seq_len)
    if vocab and arch.vocab_size < vocab:
        raise LmforgeError(
            f"model.vocab_size={arch.vocab_size} is smaller than the tokenizer's {vocab}"
        )
    check_parallel_layout(spec.parallel, env.world_size, arch, train.seq_len)
    check_tensor_parallel_use(spec.parallel, spec.lora is not None, bool(spec.train.eval_tasks))
    check_context_parallel(env.device.type, spec.parallel)
    if env.ranks_per_node:
        check_placement(spec.parallel, env.ranks_per_node)
    dims = parallel_dims(spec.parallel, env.world_size, env.ranks_per_node)
    loop = spec.train
    plan = batch_plan(loop.global_batch_tokens, loop.micro_batch_size, dims.dp, train.seq_len)
    total = loop.max_steps or max(1, (loop.max_tokens or 0) // plan.global_batch_tokens)
    hw = for_worker(spec.hardware, loop, env.device)
    torch.manual_seed(loop.seed)
    tok = storage.join(data, "tokenizer.json")
    return Run(
        spec=spec,
        arch=arch,
        dims=dims,
        dp_rank=dims.dp_rank(env.rank),
        train=train,
        val=val,
        plan=plan,
        total_steps=total,
        bf16=hw.bf16,
        precision_reason=hw.precision_reason,
        flops_per_token=training_flops_per_token(arch, train.seq_len, spec.lora),
        peak_tflops=hw.peak_tflops,
        peak_source=hw.peak_source,
        val_tokens_per_byte=(
            tokens_per_byte(manifest, "val", val.num_rows, val.block_len) if val else None
        ),
        tokenizer_json=storage.read_text(tok) if storage.exists(tok) else None,
    )


# Python's automatic collector pauses at arbitrary steps, on each rank at different ones, and
# every collective then waits for the slowest rank: collect at the same steps everywhere
# instead (as torchtitan does). Young generations only: cheap, and the loop makes few cycles.
GC_EVERY_STEPS = 50


@contextlib.contextmanager
def manual_gc() -> Iterator[None]:
    """Automatic garbage collection off for the training loop (`collect_garbage` instead)."""
    enabled = gc.isenabled()
    gc.disable()
    gc.collect(1)
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def collect_garbage(step: int, every: int = GC_EVERY_STEPS) -> None:
    if step % every == 0:
        gc.collect(1)


def autocast(run: Run, env: WorkerEnv):
    if not run.bf16:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=torch.bfloat16)
