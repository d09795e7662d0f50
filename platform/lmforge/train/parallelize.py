"""Distribution, applied in one place and one fixed order (as in torchtitan):

1. activation checkpointing, per transformer block (recompute activations in backward);
2. torch.compile, per block (`Module.compile` in place, so parameter names do not change);
3. FSDP2 `fully_shard` on each block, then on the root (embeddings, final norm, head), with a
   `MixedPrecisionPolicy`: bf16 params and fp32 gradient reduction for bf16 training on GPU.
   On one node the mesh is 1-D (plain FSDP); across nodes 2-D (HSDP: replicate across nodes,
   shard within one), so parameter all-gathers and gradient reduce-scatters stay on the fast
   intra-node links and only one gradient all-reduce per step crosses the network.

The order matters: checkpointing wraps the block that compile then traces, and FSDP's
all-gather/reduce-scatter hooks go on the outside of both. Large models are built on the meta
device, sharded, and only then materialised (`to_empty` + `init_weights`), so no worker ever
holds a full copy. The model code (lmforge.model.llama) knows none of this. Torch only.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lmforge.model.llama import Llama, LlamaConfig, num_params

META_INIT_MIN_PARAMS = 500_000_000
# A long timeout covers the first step (compilation, NCCL communicator setup, a slow first
# read); after it a hung collective should fail the run in minutes, not half an hour.
FIRST_STEP_TIMEOUT = timedelta(minutes=30)
STEADY_TIMEOUT = timedelta(minutes=10)


def init_process_group(device: torch.device) -> None:
    """Join the process group from the torchrun-style env vars: NCCL on GPUs, gloo on CPU.

    Ray Train's TorchTrainer does this itself before the loop starts; this is for plain runs.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=FIRST_STEP_TIMEOUT)


def build_model(
    cfg: LlamaConfig,
    device: torch.device,
    *,
    seed: int,
    fsdp: bool,
    activation_checkpointing: bool = False,
    compile: bool = False,
    bf16: bool = False,
    meta_init: bool | None = None,
    prepare=None,
    ranks_per_node: int | None = None,
) -> nn.Module:
    """The model, initialised from `seed`, parallelised, on `device`.

    `prepare(model)`, when given, changes the bare model before it is parallelised (fine-tuning
    adds LoRA adapters there, so FSDP2 shards the final set of parameters).

    Small models are initialised in full on every worker (the same numbers as a 1-process run)
    and then sharded; large ones (or `meta_init=True`) on the meta device. `ranks_per_node`
    (None: all on one node) picks plain FSDP or HSDP, see `mesh_shape`.
    """
    if meta_init is None:
        meta_init = fsdp and num_params(cfg) >= META_INIT_MIN_PARAMS
    torch.manual_seed(seed)
    if meta_init:
        with torch.device("meta"):
            model = Llama(cfg)
    else:
        with torch.device(device):  # initialise where it will train (no host copy of a big model)
            model = Llama(cfg)
    if prepare is not None:
        prepare(model)
    model = parallelize(
        model,
        fsdp=fsdp,
        activation_checkpointing=activation_checkpointing,
        compile=compile,
        param_dtype=torch.bfloat16 if bf16 and device.type == "cuda" else None,
        mesh=data_parallel_mesh(device, ranks_per_node) if fsdp else None,
    )
    if meta_init:
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights(seed=seed)
            if prepare is not None:
                from lmforge.model.lora import init_lora_weights

                init_lora_weights(model)
    return model


def parallelize(
    model: Llama,
    *,
    fsdp: bool,
    activation_checkpointing: bool = False,
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    mesh=None,
) -> Llama:
    """Apply checkpointing, compile and FSDP2 to `model` in place (see the module docstring).

    `mesh`: FSDP2's DeviceMesh, 1-D (shard) or 2-D (replicate, shard: HSDP); None: every rank
    of the default group, sharded.
    """
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for name, block in list(model.layers.items()):
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in model.layers.values():
            block.compile()
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        blocks = list(model.layers.values())
        for i, block in enumerate(blocks):
            # The last block's params are needed again at once by backward: keep them gathered.
            fully_shard(
                block,
                mesh=mesh,
                mp_policy=mp,
                reshard_after_forward=reshard_after_forward and i < len(blocks) - 1,
            )
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def mesh_shape(world_size: int, ranks_per_node: int | None) -> tuple[int, int]:
    """(replicas, shards) of the data-parallel mesh: (1, W) on one node (plain FSDP); across
    whole nodes (nodes, ranks per node) (HSDP: each node holds one sharded replica).

    Ranks are numbered node by node (Ray Train orders its workers by node, torchrun by
    node rank), so each row of the mesh is one node. Uneven nodes fall back to plain FSDP.
    """
    per_node = ranks_per_node or world_size
    if per_node >= world_size or world_size % per_node:
        return 1, world_size
    return world_size // per_node, per_node


def data_parallel_mesh(device: torch.device, ranks_per_node: int | None):
    """The DeviceMesh `mesh_shape` gives for this process group; None without one."""
    if not dist.is_initialized():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    replicas, shards = mesh_shape(dist.get_world_size(), ranks_per_node)
    if replicas == 1:
        return init_device_mesh(device.type, (shards,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(
        device.type, (replicas, shards), mesh_dim_names=("dp_replicate", "dp_shard")
    )


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether this backward reduce-scatters (FSDP2); off, gradients accumulate unsharded."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def shorten_collective_timeout(timeout: timedelta = STEADY_TIMEOUT) -> bool:
    """After the first step: lower every process group's timeout (the long one was for compile
    and warm-up). Every rank calls it; True where the backend took the new timeout."""
    if not dist.is_initialized():
        return False
    from torch.distributed import distributed_c10d as c10d

    # A rank that lowered its timeout must not wait on one still in its first step.
    dist.barrier()
    try:
        for group in list(c10d._world.pg_map):
            c10d._set_pg_timeout(timeout, group)
    except (AttributeError, RuntimeError, ValueError, AssertionError):
        return False  # a backend or torch version without per-group timeouts: keep the long one
    return True
