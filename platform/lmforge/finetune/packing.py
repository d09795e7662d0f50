"""Packing SFT examples into rows of seq_len + 1 slots (the columns are described in
lmforge.finetune.data): first-fit in arrival order over the PACK_WINDOW most recently opened
rows. When an example fits none of them and the window is full, the oldest row is closed (and
written), so memory stays bounded; the result depends only on the order of the examples.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

PACK_WINDOW = 64  # open rows that first-fit searches; older ones are closed and written
Example = tuple[list[int], list[int]]  # (ids, mask)


class RowPacker:
    """Examples -> rows of `block` slots (module doc), first-fit over the PACK_WINDOW most
    recent open rows; full tables of closed rows come out of `add` and `finish`."""

    def __init__(self, block: int, packing: bool, pad_id: int, rows_per_table: int):
        self.block, self.packing, self.pad_id = block, packing, pad_id
        self.rows_per_table = rows_per_table
        self.open: list[list[Example]] = []
        self.free = np.zeros(PACK_WINDOW, dtype=np.int64)  # free slots of each open row
        self.closed: list[list[Example]] = []
        self.stats = {"examples": 0, "rows": 0, "tokens": 0, "loss_tokens": 0}

    def add(self, ids: list[int], mask: list[int]) -> Iterator[pa.Table]:
        n = len(ids)
        if n > self.block:
            raise ValueError(f"an example of {n} tokens does not fit in a row of {self.block}")
        if self.packing:
            fits = np.flatnonzero(self.free[: len(self.open)] >= n)
            if len(fits):
                i = int(fits[0])
                self.open[i].append((ids, mask))
                self.free[i] -= n
                return self._flush(False)
        if self.open and (not self.packing or len(self.open) == PACK_WINDOW):
            self._close_oldest()
        self.open.append([(ids, mask)])
        self.free[len(self.open) - 1] = self.block - n
        return self._flush(False)

    def finish(self) -> Iterator[pa.Table]:
        while self.open:
            self._close_oldest()
        return self._flush(True)

    def _close_oldest(self) -> None:
        self.closed.append(self.open.pop(0))
        self.free[:-1] = self.free[1:].copy()

    def _flush(self, last: bool) -> Iterator[pa.Table]:
        while len(self.closed) >= self.rows_per_table or (last and self.closed):
            rows, self.closed = (
                self.closed[: self.rows_per_table],
                self.closed[self.rows_per_table :],
            )
            yield self._table(rows)

    def _table(self, rows: list[list[Example]]) -> pa.Table:
        tokens = np.full((len(rows), self.block), self.pad_id, dtype=np.int32)
        loss = np.zeros((len(rows), self.block), dtype=np.int8)
        segments = np.zeros((len(rows), self.block), dtype=np.int32)
        for r, examples in enumerate(rows):
            at = 0
            for seg, (ids, mask) in enumerate(examples, 1):
                end = at + len(ids)
                tokens[r, at:end], loss[r, at:end], segments[r, at:end] = ids, mask, seg
                loss[r, at] = 0  # nothing of its own example precedes its first token
                at = end
            self.stats["examples"] += len(examples)
        self.stats["rows"] += len(rows)
        self.stats["tokens"] += int((segments > 0).sum())
        self.stats["loss_tokens"] += int(loss.sum())
        block = self.block

        def column(a: np.ndarray) -> pa.FixedSizeListArray:
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), block)

        return pa.table(
            {"tokens": column(tokens), "loss_mask": column(loss), "segments": column(segments)}
        )
