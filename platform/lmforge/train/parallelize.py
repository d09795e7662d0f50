"""Distribution, applied in one place and one fixed order (as in torchtitan):

1. activation checkpointing, per transformer block (recompute activations in backward);
2. torch.compile, per block (`Module.compile` in place, so parameter names do not change);
3. FSDP2 `fully_shard` on each block, then on the root (embeddings, final norm, head), with a
   `MixedPrecisionPolicy`: bf16 params and fp32 gradient reduction for bf16 training on GPU.

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


def init_process_group(device: torch.device) -> None:
    """Join the process group from the torchrun-style env vars: NCCL on GPUs, gloo on CPU.

    Ray Train's TorchTrainer does this itself before the loop starts; this is for plain runs.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))


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
) -> nn.Module:
    """The model, initialised from `seed`, parallelised, on `device`.

    `prepare(model)`, when given, changes the bare model before it is parallelised (fine-tuning
    adds LoRA adapters there, so FSDP2 shards the final set of parameters).

    Small models are initialised in full on every worker (the same numbers as a 1-process run)
    and then sharded; large ones (or `meta_init=True`) on the meta device.
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
) -> Llama:
    """Apply checkpointing, compile and FSDP2 to `model` in place (see the module docstring)."""
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
                mp_policy=mp,
                reshard_after_forward=reshard_after_forward and i < len(blocks) - 1,
            )
        fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP2's reduce-scatter on accumulation micro-steps; sync on the last one."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
