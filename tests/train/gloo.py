"""Run a function on N CPU processes joined in a gloo process group, as FSDP2 runs on N GPUs.

`run_ranks(fn, n, *args)` starts n fresh (spawned) processes; each joins the group, sets one
torch thread, calls `fn(rank, *args)` and sends back its return value; an exception on any rank
fails the caller with that rank's traceback. `fn` must be importable (a module-level function).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import traceback
from typing import Any

import torch

from tests.conftest import free_port


def _entry(fn, rank: int, world: int, port: int, env: dict, queue, args) -> None:
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # Serialised here: a tensor sent as is would be shared memory that dies with this process.
        buffer = io.BytesIO()
        torch.save(fn(rank, *args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, env: dict | None = None, timeout: float = 240) -> list[Any]:
    """fn(rank, *args) on `world` gloo ranks; their return values, by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, env or {}, queue, args))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
