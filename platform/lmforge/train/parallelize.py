"""Distribution, applied in one place and one fixed order (as in torchtitan):

0. tensor parallelism on the mesh's "tp" dimension (`apply_tensor_parallel`): each block's
   q/k/v and gate/up split column-wise, o and down row-wise, the norms sequence-parallel, the
   head's logits left sharded on the vocabulary for a loss-parallel loss (`loss_context`);
1. activation checkpointing, per transformer block (recompute activations in backward);
2. torch.compile, per block (`Module.compile` in place, so parameter names do not change);
3. FSDP2 `fully_shard` on each block, then on the root (embeddings, final norm, head), with a
   `MixedPrecisionPolicy`: bf16 params and fp32 gradient reduction for bf16 training on GPU.
   FSDP shards over the mesh's data-parallel dimensions (`fsdp_mesh`): "dp_shard" (plain
   FSDP), or ("dp_replicate", "dp_shard") across nodes (HSDP: parameter all-gathers and
   gradient reduce-scatters stay on the fast intra-node links, one gradient all-reduce per step
   crosses the network); with context parallelism dp_shard and cp flattened into one.

The order matters: tensor parallelism turns the weights into DTensors on the "tp" mesh that
FSDP then shards again on its own dimension (2-D parameters), checkpointing wraps the block
that compile then traces, and FSDP's all-gather/reduce-scatter hooks go on the outside.
The mesh (train/layout.py `ParallelDims.build_mesh`) is built once per worker. Large models are built on the meta
device, sharded, and only then materialised (`to_empty` + `init_weights`), so no worker ever
holds a full copy. The model code (lmforge.model.llama) knows none of this. Torch only.
"""

from __future__ import annotations

import contextlib
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
    mesh=None,
) -> nn.Module:
    """The model, initialised from `seed`, parallelised, on `device`.

    `prepare(model)`, when given, changes the bare model before it is parallelised (fine-tuning
    adds LoRA adapters there, so FSDP2 shards the final set of parameters).

    Small models are initialised in full on every worker (the same numbers as a 1-process run)
    and then sharded; large ones (or `meta_init=True`) on the meta device. `mesh`: the
    worker's DeviceMesh with every dimension of layout.MESH_DIMS (None: no process group, or
    FSDP over every rank): tensor parallel on its "tp" dimension, FSDP on the data-parallel ones.
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
        mesh=mesh,
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
    """Apply tensor parallelism, checkpointing, compile and FSDP2 to `model` in place (see the
    module docstring). `mesh`: the worker's named DeviceMesh; None: FSDP over every rank of the
    default group, no tensor parallelism.
    """
    if mesh is not None and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
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
        mesh = fsdp_mesh(mesh)
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


def fsdp_mesh(mesh):
    """The data-parallel submesh FSDP2 shards over: "dp_shard", ("dp_replicate", "dp_shard")
    for HSDP; with context parallelism "dp_shard" and "cp" flattened into one dimension (the
    ranks of a cp group hold different tokens of the same rows, so they share gradients as data
    parallel ranks do, as in torchtitan). None stays None (every rank)."""
    if mesh is None:
        return None
    shard = "dp_shard"
    if mesh["cp"].size() > 1:
        shard = "dp_shard_cp"
        mesh[("dp_shard", "cp")]._flatten(shard)
    if mesh["dp_replicate"].size() > 1:
        return mesh[("dp_replicate", shard)]
    return mesh[shard]


def apply_tensor_parallel(model: Llama, tp_mesh) -> None:
    """Megatron-style tensor parallelism with sequence parallelism, in place, on `tp_mesh`.

    Between blocks the residual stream is sharded on the sequence (B, T/tp, D), and so are the
    norms (SequenceParallel: their weights replicated); before attention and the MLP it is
    all-gathered to (B, T, D); q/k/v and gate/up are split column-wise (each rank holds whole
    heads, H/tp and K/tp of them, and F/tp of the FFN width), o and down row-wise, whose partial
    sums are reduce-scattered back onto the sequence. The embedding is split on the vocab
    (row-wise), the head column-wise on the vocab, and its logits stay sharded on the vocab: a
    DTensor whose local part is (B, T, V/tp) (loss parallelism, as in torchtitan). No rank ever
    holds the full (B, T, V) logits: the loss is computed on the shards under `loss_context`.
    A tied head shares the embedding's weight (both Shard(0) on the vocab) and works the same.
    The soft cap (`logit_softcap`) is elementwise, so it runs on the shards as they are.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tied = model.output.weight is model.tok_embeddings.weight
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            # Shard(-1), kept a DTensor: the loss (loss_parallel) needs the layout to see it.
            "output": ColwiseParallel(
                input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False
            ),
        },
    )
    # Block.forward calls attn(x, rope, positions, cache, mask) and mlp(x): only x is laid out.
    gather_x = (Shard(1), None, None, None, None)
    for block in model.layers.values():
        plan = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(
                input_layouts=gather_x, desired_input_layouts=(Replicate(), None, None, None, None)
            ),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "mlp.w1": ColwiseParallel(),
            "mlp.w3": ColwiseParallel(),
            "mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
        parallelize_module(block, tp_mesh, plan)
    if tied:  # both are Shard(0) on the vocab: one parameter again
        model.output.weight = model.tok_embeddings.weight


def loss_context(mesh) -> contextlib.AbstractContextManager:
    """Where a loss is computed from the model's logits, forward and backward.

    Under tensor parallelism (`mesh`'s "tp" > 1) the logits are sharded on the vocab
    (`apply_tensor_parallel`) and `loss_parallel` makes F.cross_entropy work on the shards: the
    max and the sum of exponentials of each token's row, and the target's logit (on the rank
    that holds it, 0 elsewhere), are all-reduced over tp; the gradient comes back sharded.
    Without it (no mesh, tp=1) nothing changes: a null context, plain tensors.
    """
    if mesh is None or mesh["tp"].size() == 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def local_loss(loss: torch.Tensor) -> torch.Tensor:
    """A loss computed under `loss_context` is a DTensor replicated over the tp ranks: its
    value as a plain tensor (gradients flow back through it), so the loop adds and scales it
    as any other; a plain tensor comes back as it is."""
    from torch.distributed.tensor import DTensor

    return loss.full_tensor() if isinstance(loss, DTensor) else loss


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
