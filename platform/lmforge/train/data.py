"""Sharded streaming of the data stage's packed Parquet shards.

The global sample order is a function of the seed only, never of the worker count: epoch `e`
visits the row groups of `train/*.parquet` in a seeded permutation, rows in order within a
group. Step `s` trains on rows [s*G, (s+1)*G) of that order (G sequences per global batch) and
worker `r` of `W` takes the contiguous slice r of it, in micro-batches. So the data position is
one integer (rows consumed), a resumed or resharded run sees exactly the rows an uninterrupted
run would, and a 1-process run with gradient accumulation sees the same global batches as W
workers. A worker reads only the row groups its rows fall in (Parquet metadata first, then
`read_row_group`), keeping one group in memory: no worker loads the dataset.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from lmforge import LmforgeError, storage


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    rows: int


MASK_COLUMNS = ("loss_mask", "segments")


class PackedShards:
    """Rows of one split (`train/` or `val/`) as (n, seq_len + 1) int64 arrays, read on demand.

    Pretraining shards have one column, `tokens`. Fine-tuning shards also have `loss_mask`
    (1 where the token is a prediction target) and `segments` (which packed example each token
    belongs to, 0 for padding), both (n, seq_len + 1): `batch` returns every column.
    """

    def __init__(self, directory: str, seed: int = 0, shuffle: bool = False) -> None:
        self.directory, self.seed, self.shuffle = directory, seed, shuffle
        files = storage.list_files(directory, suffix=".parquet")
        if not files:
            raise LmforgeError(f"no .parquet shards in {directory}")
        self.groups: list[RowGroup] = []
        self.block_len = 0
        self.columns = ["tokens"]
        for path in files:
            shard = self._open(path)
            schema = shard.schema_arrow
            self.block_len = schema.field("tokens").type.list_size
            # Fine-tuning shards (lmforge.finetune.data) add per-token loss masks and documents.
            self.columns = ["tokens"] + [c for c in MASK_COLUMNS if c in schema.names]
            meta = shard.metadata
            self.groups += [
                RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
            ]
        self.groups = [g for g in self.groups if g.rows]
        self.num_rows = sum(g.rows for g in self.groups)
        if self.num_rows == 0 or self.block_len < 2:
            raise LmforgeError(f"{directory}: the shards hold no token blocks")
        self._epoch_order: tuple[int, list[int], np.ndarray] | None = None
        self._cached: tuple[tuple[str, int], dict[str, np.ndarray]] | None = None

    @property
    def seq_len(self) -> int:
        return self.block_len - 1

    def _open(self, path: str) -> pq.ParquetFile:
        fs, inner = storage.resolve(path)
        return pq.ParquetFile(fs.open_input_file(inner))

    def _order(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """Row-group order of an epoch and the first global row of each group in it."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            n = len(self.groups)
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(n).tolist()
                if self.shuffle
                else list(range(n))
            )
            starts = np.cumsum([0] + [self.groups[i].rows for i in order])
            self._epoch_order = (epoch, order, starts)
        return self._epoch_order[1], self._epoch_order[2]

    @property
    def masked(self) -> bool:
        """True for fine-tuning shards (loss masks and packed documents)."""
        return len(self.columns) > 1

    def _group_rows(self, group: RowGroup) -> dict[str, np.ndarray]:
        key = (group.path, group.index)
        if self._cached is None or self._cached[0] != key:
            table = self._open(group.path).read_row_group(group.index, columns=self.columns)
            arrays = {}
            for name in self.columns:
                flat = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                arrays[name] = flat.astype(np.int64).reshape(-1, self.block_len)
            self._cached = (key, arrays)
        return self._cached[1]

    def rows(self, start: int, count: int) -> np.ndarray:
        """Tokens of global rows [start, start + count) of the (endless, epoch after epoch) order."""
        return self.batch(start, count)["tokens"]

    def batch(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Every column of global rows [start, start + count), each (count, seq_len + 1)."""
        out = []
        while count > 0:
            epoch, offset = divmod(start, self.num_rows)
            order, starts = self._order(epoch)
            g = int(np.searchsorted(starts, offset, side="right")) - 1
            group = self.groups[order[g]]
            within = offset - int(starts[g])
            take = min(count, group.rows - within)
            arrays = self._group_rows(group)
            out.append({k: v[within : within + take] for k, v in arrays.items()})
            start, count = start + take, count - take
        return {k: np.concatenate([part[k] for part in out]) for k in self.columns}


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch splits into data-parallel ranks and micro-batches. `world_size` is the
    number of data-parallel ranks (`ParallelDims.dp`): the ranks of one tensor, context or
    pipeline parallel group read the same rows."""

    seq_len: int
    micro_batch_size: int
    world_size: int
    accum_steps: int

    @property
    def global_batch_rows(self) -> int:
        return self.micro_batch_size * self.world_size * self.accum_steps

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch_rows * self.seq_len

    def micro_rows(self, step: int, rank: int, micro: int) -> tuple[int, int]:
        """(first global row, count) of one data-parallel rank's micro-batch at an optimizer
        step (`rank`: `ParallelDims.dp_rank`)."""
        per_worker = self.micro_batch_size * self.accum_steps
        first = step * self.global_batch_rows + rank * per_worker + micro * self.micro_batch_size
        return first, self.micro_batch_size


class Prefetcher:
    """The host side of upcoming steps' batches, made by one background thread ahead of use.

    `load(step)` returns any nesting of dicts/lists of numpy arrays; each array becomes a torch
    tensor, pinned when `pin` (a CUDA run), so the loop's `.to(device, non_blocking=True)` is a
    DMA that overlaps the compute instead of a blocking copy from pageable memory. Reading the
    Parquet row groups (pyarrow releases the GIL) and pinning run while the GPU works on the
    current step. Steps are asked for in order from the first `get`; up to `depth` wait ready.
    An error in `load` is raised by `get` for that step. Steps from `end` on are never read.
    The thread is a daemon: a worker that fails mid-run exits without waiting for it.
    """

    def __init__(
        self, load: Callable[[int], Any], pin: bool, end: int | None = None, depth: int = 2
    ) -> None:
        self.load, self.pin, self.end = load, pin, end
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.expect: int | None = None

    def get(self, step: int) -> Any:
        if self.thread is None:
            self.expect = step
            self.thread = threading.Thread(
                target=self._run, args=(step,), name="lmforge-prefetch", daemon=True
            )
            self.thread.start()
        if step != self.expect:
            raise ValueError(f"prefetcher: step {step} asked for, {self.expect} is next")
        self.expect = step + 1
        got, value, error = self.ready.get()
        assert got == step
        if error is not None:
            raise error
        return value

    def _run(self, step: int) -> None:
        while not self.stop.is_set() and (self.end is None or step < self.end):
            try:
                item = (step, _to_tensors(self.load(step), self.pin), None)
            except BaseException as e:  # handed to the training thread, raised there
                item = (step, None, e)
            while not self.stop.is_set():
                try:
                    self.ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _to_tensors(value: Any, pin: bool) -> Any:
    import torch  # here: the driver imports this module for batch_plan and needs no torch

    if isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        return tensor.pin_memory() if pin else tensor
    if isinstance(value, dict):
        return {k: _to_tensors(v, pin) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_tensors(v, pin) for v in value)
    return value


def batch_plan(
    global_batch_tokens: int, micro_batch_size: int, world_size: int, seq_len: int
) -> BatchPlan:
    """The accumulation steps for a global batch in tokens over `world_size` data-parallel
    ranks (num_workers / (tp x pp x cp)); an uneven split is a clear error."""
    per_micro_step = seq_len * micro_batch_size * world_size
    if global_batch_tokens % per_micro_step:
        lower = max(per_micro_step, global_batch_tokens // per_micro_step * per_micro_step)
        raise LmforgeError(
            f"train.global_batch_tokens={global_batch_tokens} is not a multiple of seq_len ({seq_len}) "
            f"x micro_batch_size ({micro_batch_size}) x data-parallel workers ({world_size}) = {per_micro_step}; "
            f"use e.g. {lower} or {lower + per_micro_step}"
        )
    return BatchPlan(seq_len, micro_batch_size, world_size, global_batch_tokens // per_micro_step)


def read_manifest(data_path: str) -> dict[str, Any]:
    """The data stage's manifest; a missing or incomplete data directory is a clear error."""
    if not data_path:
        raise LmforgeError("data.path is not set: give the data stage's output directory")
    manifest = storage.join(data_path, "manifest.json")
    if not storage.exists(manifest):
        raise LmforgeError(
            f"{data_path} has no manifest.json: is it a `lmforge data prepare` output?"
        )
    if not storage.is_complete(data_path):
        raise LmforgeError(f"{data_path} is incomplete (no _SUCCESS): rerun the data stage first")
    return storage.read_json(manifest)


def tokens_per_byte(
    manifest: dict[str, Any], split: str, rows: int, block_len: int
) -> float | None:
    """Tokens per UTF-8 byte of a split's text, for bits-per-byte; None when the manifest lacks bytes.
    Fine-tuning data (`kind: sft`): of the loss tokens, the only ones the val loss averages."""
    if manifest.get("kind") == "sft":
        tokens, nbytes = manifest.get(f"loss_tokens_{split}"), manifest.get(f"loss_bytes_{split}")
        return tokens / nbytes if tokens and nbytes else None
    nbytes = manifest.get(f"bytes_{split}")
    if not nbytes:
        return None
    tokens = manifest.get(f"tokens_{split}") or rows * block_len
    return tokens / nbytes


def bits_per_byte(loss_nats: float, tokens_per_byte_: float | None) -> float | None:
    if tokens_per_byte_ is None:
        return None
    return loss_nats / math.log(2) * tokens_per_byte_
