"""The parallel layout: how the workers divide into pipeline, data, context and tensor parallel
groups, as one config section (`ParallelConfig`), one arithmetic (`ParallelDims`) and one
`DeviceMesh`, built once per worker.

The mesh's dimensions are, outermost first, ("pp", "dp_replicate", "dp_shard", "cp", "tp"), as
in torchtitan. Ray Train and torchrun number ranks node by node, so the innermost dimension is
the one whose groups share a node: tensor parallelism (a collective per matmul) stays on the
fast intra-node links, and pipeline stages (one send per micro-batch) span nodes. The model code
knows nothing of this; `parallelize.py` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from lmforge import LmforgeError
from lmforge.config import StrictModel

if TYPE_CHECKING:
    from lmforge.model.llama import LlamaConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


class ParallelConfig(StrictModel):
    fsdp: bool = Field(
        True,
        description="Shard params, grads and optimizer state with FSDP2 (per block, then the root) over the data-parallel workers.",
    )
    tp: int = Field(
        1,
        ge=1,
        description="Tensor-parallel degree: each block's matmuls split over this many workers of one node (q/k/v and gate/up column-wise, o and down row-wise, sequence-parallel norms). Must divide the heads, the KV heads, the FFN width, the vocabulary and seq_len.",
    )
    pp: int = Field(
        1,
        ge=1,
        description="Pipeline-parallel degree: the blocks split by layer into this many stages (across nodes); the micro-batches of one step (gradient accumulation) fill the pipeline. Must divide the layers.",
    )
    pp_schedule: Literal["1f1b", "interleaved_1f1b"] = Field(
        "1f1b",
        description="Pipeline schedule: 1f1b (one stage per worker) or interleaved_1f1b (two stages per worker, a smaller bubble; the layers must divide by 2 x pp).",
    )
    cp: int = Field(
        1,
        ge=1,
        description="Context-parallel degree: each sequence split over this many workers (ring attention), for long contexts. GPU only. Must divide seq_len by 2 x cp.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations in backward (less memory, ~30% more compute).",
    )
    compile: bool = Field(False, description="torch.compile each transformer block.")
    meta_init: bool | None = Field(
        None,
        description="Build on the meta device and materialise sharded (no full copy on any worker). None: for models over 500M parameters.",
    )
    grad_reduce: Literal["every_micro_batch", "last_micro_batch"] = Field(
        "every_micro_batch",
        description="When FSDP2 reduce-scatters gradients under accumulation. every_micro_batch: each micro-batch (only the gradient shard is kept; more communication). last_micro_batch: once per step (less communication, but each worker holds a full unsharded fp32 gradient, 4 bytes per parameter, which `lmforge plan` counts).",
    )

    @property
    def model_parallel(self) -> int:
        """Workers that hold one copy of the model between them (tp x pp x cp)."""
        return self.tp * self.pp * self.cp


@dataclass(frozen=True)
class ParallelDims:
    """The degree of each mesh dimension; their product is the world size."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads different rows."""
        return self.dp_replicate * self.dp_shard

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on each dimension (row-major over MESH_DIMS)."""
        out = {}
        for name in reversed(MESH_DIMS):
            size = getattr(self, name)
            out[name] = rank % size
            rank //= size
        return {name: out[name] for name in MESH_DIMS}

    def dp_rank(self, rank: int) -> int:
        """Which slice of the data this rank reads (ranks of one tp/cp/pp group read the same)."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def build_mesh(self, device_type: str):
        """The world's DeviceMesh with every dimension named (size-1 ones included)."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(getattr(self, name) for name in MESH_DIMS)
        return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def parallel_dims(
    parallel: ParallelConfig, world: int, ranks_per_node: int | None = None
) -> ParallelDims:
    """Split `world` workers: tp, cp, pp as configured, data parallel the rest. The data-parallel
    ranks are HSDP (replicate across nodes, shard within one) when each node holds whole
    data-parallel shard groups and there is no pipeline; else plain FSDP."""
    check_parallel_layout(parallel, world)
    dp = world // parallel.model_parallel
    replicate = 1
    per_node = ranks_per_node or world
    inner = parallel.tp * parallel.cp
    if parallel.pp == 1 and per_node < world and per_node % inner == 0:
        dp_per_node = per_node // inner
        if dp_per_node < dp and dp % dp_per_node == 0 and world % per_node == 0:
            replicate = dp // dp_per_node
    return ParallelDims(
        pp=parallel.pp,
        dp_replicate=replicate,
        dp_shard=dp // replicate,
        cp=parallel.cp,
        tp=parallel.tp,
    )


def check_parallel_layout(
    parallel: ParallelConfig,
    num_workers: int,
    model: LlamaConfig | None = None,
    seq_len: int | None = None,
) -> None:
    """The one check of the parallel layout: both stages before Ray starts, and every LoopSpec.
    With the architecture (and the data's seq_len) it also checks what must divide."""
    if not parallel.fsdp and num_workers > 1 and parallel.model_parallel == 1:
        raise LmforgeError(
            "parallel.fsdp=false trains on one worker only: set resources.num_workers=1"
        )
    if not parallel.fsdp and num_workers > parallel.model_parallel:
        raise LmforgeError(
            f"parallel.fsdp=false has no data parallelism (nothing averages the gradients): set "
            f"resources.num_workers={parallel.model_parallel} (tp x pp x cp) or parallel.fsdp=true"
        )
    if num_workers % parallel.model_parallel:
        raise LmforgeError(
            f"resources.num_workers={num_workers} does not divide into parallel.tp={parallel.tp} x "
            f"pp={parallel.pp} x cp={parallel.cp} = {parallel.model_parallel}: use a multiple of "
            f"{parallel.model_parallel} workers or lower those degrees"
        )
    if model is not None:
        stages = parallel.pp * (2 if parallel.pp_schedule == "interleaved_1f1b" else 1)
        for what, value, by in (
            ("model.n_heads", model.n_heads, ("parallel.tp", parallel.tp)),
            ("model.n_kv_heads", model.n_kv_heads, ("parallel.tp", parallel.tp)),
            ("model.ffn_dim", model.ffn_dim, ("parallel.tp", parallel.tp)),
            ("model.vocab_size", model.vocab_size, ("parallel.tp", parallel.tp)),
            ("model.n_layers", model.n_layers, ("pipeline stages", stages)),
        ):
            if value % by[1]:
                raise LmforgeError(
                    f"{what}={value} does not divide by {by[0]}={by[1]}: choose a degree that "
                    f"divides it, or change the model"
                )
    if seq_len is not None and seq_len % parallel.tp:
        raise LmforgeError(
            f"seq_len={seq_len} does not divide by parallel.tp={parallel.tp} (sequence "
            f"parallelism splits each sequence between the tensor-parallel ranks): change "
            f"seq_len or tp"
        )
    if seq_len is not None and parallel.cp > 1 and seq_len % (2 * parallel.cp):
        raise LmforgeError(
            f"seq_len={seq_len} does not divide by 2 x parallel.cp={2 * parallel.cp} (context "
            f"parallelism splits each sequence into 2 x cp load-balanced chunks): change seq_len "
            f"or cp"
        )


def check_tensor_parallel_use(parallel: ParallelConfig, lora: bool, eval_tasks: bool) -> None:
    """What tensor parallelism does not cover yet, refused before training starts."""
    if parallel.tp == 1:
        return
    if lora:
        raise LmforgeError(
            f"parallel.tp={parallel.tp} with LoRA is not supported (the adapters wrap the linears "
            f"tensor parallelism splits): set parallel.tp=1 (LoRA trains few parameters: FSDP is enough)"
        )
    if eval_tasks:
        raise LmforgeError(
            f"train.eval_tasks do not run under parallel.tp={parallel.tp} (generation's KV cache "
            f"holds every head): run `lmforge eval` on the exported model, or set parallel.tp=1"
        )


def check_placement(parallel: ParallelConfig, ranks_per_node: int) -> None:
    """A tensor-parallel group (with its context-parallel ring) must sit on one node: Ray Train
    numbers workers node by node and tp x cp are the innermost mesh dimensions, so tp x cp
    dividing the ranks per node keeps every such group inside one node; pipeline stages and
    data-parallel replicas may span nodes."""
    inner = parallel.tp * parallel.cp
    if ranks_per_node % inner:
        raise LmforgeError(
            f"parallel.tp={parallel.tp} x cp={parallel.cp} = {inner} does not divide the "
            f"{ranks_per_node} workers per node, so a tensor-parallel group would span nodes: "
            f"use tp x cp dividing {ranks_per_node} (put the rest in parallel.pp or data parallel)"
        )
