"""Context parallelism: each sequence split over the mesh's "cp" ranks, attention as a ring.

`cp_context(model, mesh, tokens, targets)` wraps one micro-step (forward and backward): on
entry torch's `context_parallel` shards the inputs, the targets and the model's RoPE table along
the sequence in place, load-balanced (with 2 x cp chunks, rank r keeps chunks r and 2 cp - 1 - r,
so every rank does the same share of causal attention), and dispatches `scaled_dot_product_attention`
to ring attention (each rank's queries against every rank's keys and values, passed round the
cp group); on exit the table is whole again. The model code knows nothing of it.

The RoPE table (model/llama.py, `rope_table`) is complex64, (max_seq_len, E/2). torch 2.13
shards a complex tensor along dim 0 as it does a real one (checked on gloo), so no real view is
needed; but the table must have exactly one row per position of the sequence, so the wrapper
swaps in its first seq_len rows for the micro-step (the model reads rows 0..T_local-1 of its
table, which are then this rank's positions, in the load-balanced order of its tokens).

Only plain causal attention: packed rows with a document mask (fine-tuning) are refused, as
ring attention takes no mask. GPU only: in torch 2.13 the CPU attention kernel
(`_scaled_dot_product_flash_attention_for_cpu`) has no context-parallel sharding rule (a 2-process
gloo run fails with NotImplementedError), so `check_context_parallel` refuses cp > 1 on a CPU
worker before anything is built; `bench/gpu_path_checks.py` checks cp=2 against cp=1 on GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from lmforge import LmforgeError

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    from lmforge.train.layout import ParallelConfig


def check_context_parallel(device_type: str, parallel: ParallelConfig) -> None:
    """One line when the layout asks for context parallelism where it cannot run."""
    if parallel.cp > 1 and device_type != "cuda":
        raise LmforgeError(
            f"parallel.cp={parallel.cp} needs GPU workers (ring attention has no CPU kernel in "
            f"torch): set parallel.cp=1 on {device_type}, or resources.gpus_per_worker=1"
        )


@contextmanager
def cp_context(
    model: torch.nn.Module,
    mesh: DeviceMesh | None,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shard `tokens` and `targets` (B, T) along T over mesh["cp"] for one forward and
    backward; yields this rank's (tokens, targets), (B, T / cp) (a contiguous input is sharded
    in place and stays so; a view, such as rows[:, :-1], is copied first). A no-op with cp = 1."""
    if mesh is None or mesh.size(mesh.mesh_dim_names.index("cp")) == 1:
        yield tokens, targets
        return
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options

    if segments is not None:
        raise LmforgeError(
            "parallel.cp > 1 trains on plain causal rows only (ring attention takes no document "
            "mask): set parallel.cp=1 for packed fine-tuning data"
        )
    T, cp = tokens.shape[1], mesh["cp"].size()
    if T % (2 * cp):
        raise LmforgeError(f"seq_len={T} does not divide by 2 x parallel.cp={2 * cp}: change one")
    _cp_options.enable_load_balance = True  # the default in torch 2.13; said, not assumed
    full = model.rope
    table = full[:T].clone()  # one row per position: sharded with the tokens
    tokens, targets = tokens.contiguous(), targets.contiguous()
    model.rope = table
    try:
        with context_parallel(
            mesh["cp"],
            buffers=[tokens, targets, table],
            buffer_seq_dims=[1, 1, 0],
            no_restore_buffers={tokens, targets, table},
        ):
            yield tokens, targets
    finally:
        model.rope = full
