"""The KV cache of incremental decoding: preallocated slots, read in place, static shapes.

Keys and values live in one tensor per kind, (layers, slots, K, S_max + 1, E): a sequence owns
a slot for its whole life and every position is written before any query reads it. A forward
pass names the slots of its rows; when those are the first B slots (every decode step: the
engine decodes slots 0..B-1, idle ones as padding) the attention reads `k[:B, :, :S]`, a view,
so no step copies the cache. The read window S and the decode batch B are rounded up to
buckets (powers of two), so a decode step has one of a few static shapes: each can be
captured once in a CUDA graph (`DecodeRunner`) and replayed. Padding tokens write into the
extra last column (a scratch position no window reaches), so they never touch real keys.

Sizing (`kv_bytes_per_token`, `fit_slots`) is a function of the model config and dtype: the
serving engine gives the cache what memory allows, and refuses a budget that cannot hold one
max-length sequence.

Only torch is imported (the GPU benchmark box has no Ray or pydantic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmforge.model.llama import LlamaConfig

MIN_SPAN = 64  # the smallest read window (fewer, larger buckets: fewer CUDA graphs)


def bucket(n: int, cap: int, smallest: int = 1) -> int:
    """n rounded up to a power of two (at least `smallest`), never above `cap`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, cap)


def kv_bytes_per_token(cfg: LlamaConfig, dtype: torch.dtype) -> int:
    """Cache bytes one token takes: keys and values x layers x KV heads x head dim x dtype."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize


def fit_slots(
    cfg: LlamaConfig, dtype: torch.dtype, max_seq_len: int, budget_bytes: int, cap: int
) -> int:
    """How many max-length sequences a budget holds (at most `cap`); ValueError if not one."""
    per_slot = kv_bytes_per_token(cfg, dtype) * (max_seq_len + 1)  # +1: the scratch column
    slots = min(cap, int(budget_bytes // per_slot))
    if slots < 1:
        raise ValueError(
            f"the KV cache budget of {budget_bytes / 2**30:.2f} GiB cannot hold one sequence of "
            f"{max_seq_len} tokens ({per_slot / 2**30:.2f} GiB in {dtype}): raise "
            "gpu_memory_utilization (or kv_cache_gb), or lower max_seq_len"
        )
    return slots


CPU_KV_CACHE_BYTES = 2 * 2**30  # the KV cache budget on a CPU when none is given
GPU_MARGIN_BYTES = 512 * 2**20  # CUDA graphs' pool, allocator fragmentation, NCCL-free slack


def activation_bytes(cfg, dtype: torch.dtype, prefill_tokens: int, slots: int) -> int:
    """Peak transient memory of a step beside the weights and the cache: a prefill chunk's
    activations (hidden, q/k/v, the SwiGLU's three F-wide tensors, attention scores if the
    kernel materialises them) and the sampling of `slots` rows of fp32 logits (logits, sorted
    values and int64 order, probabilities, noise: ~7 x 4 bytes per vocabulary entry)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = (4 * cfg.dim + 2 * cfg.n_heads * cfg.head_dim + 3 * cfg.ffn_dim) * itemsize
    scores = cfg.n_heads * prefill_tokens * cfg.max_seq_len * 4  # a chunk against the window
    return prefill_tokens * per_token + scores + slots * cfg.vocab_size * 28


def kv_budget(
    device: torch.device,
    kv_cache_bytes: int | None,
    gpu_memory_utilization: float,
    reserve_bytes: int,
) -> int:
    """Bytes the KV cache may take: `kv_cache_bytes` when given; on a GPU, the fraction
    `gpu_memory_utilization` of its memory less what is in use now (the weights, the CUDA
    context, other processes) and the step's transient peak; on a CPU, CPU_KV_CACHE_BYTES."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    if device.type != "cuda":
        return CPU_KV_CACHE_BYTES
    free, total = torch.cuda.mem_get_info(device)
    return int(total * gpu_memory_utilization) - (total - free) - reserve_bytes - GPU_MARGIN_BYTES


class LayerCache:
    """One layer's view of the cache for the rows of the current forward pass."""

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store k, v (B, K, T, E) at the pass's write positions; return the cached keys and
        values of the read window (B, K, S, E) and the (B, 1, T, S) mask of what each query
        may see (`positions` are the rotary ones; the write positions differ only for padding,
        which goes to the scratch column)."""
        c = self.cache
        keys, values = c.k[self.layer], c.v[self.layer]
        rows = c.rows[:, None]  # (B, 1) against the write positions (B, T)
        keys[rows, :, c.write] = k.transpose(1, 2)  # the indexed view is (B, T, K, E)
        values[rows, :, c.write] = v.transpose(1, 2)
        S = c.span
        if c.prefix:  # the first B slots: a view of the cache, nothing copied
            B = k.shape[0]
            return keys[:B, :, :S], values[:B, :, :S], c.mask
        return keys[c.rows, :, :S], values[c.rows, :, :S], c.mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store k, v (B, K, T, E) and attend q (B, H, T, E) over the cached keys: (B, H, T, E).

        Grouped-query attention with a mask would make PyTorch's SDPA fall back to its math
        kernel, which repeats every cached key and value H/K times. Instead each group of H/K
        query heads is folded into the query length, so one KV head serves (H/K) x T queries
        and the fused kernels read the cache as it is.
        """
        keys, values, _ = self.update(k, v, positions)
        B, H, T, E = q.shape
        K = keys.shape[1]
        y = F.scaled_dot_product_attention(
            q.reshape(B, K, H // K * T, E), keys, values, attn_mask=self.cache.folded_mask
        )
        return y.view(B, H, T, E)


class KVCache:
    """Keys and values of every layer for `slots` sequences of up to `max_seq_len` tokens."""

    def __init__(
        self,
        cfg: LlamaConfig,
        slots: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_seq_len: int | None = None,
    ) -> None:
        self.slots = slots
        self.groups = cfg.n_heads // cfg.n_kv_heads  # query heads per KV head
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.scratch = self.max_seq_len  # the last column: where padding tokens write
        shape = (cfg.n_layers, slots, cfg.n_kv_heads, self.max_seq_len + 1, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.device = self.k.device
        # The current pass (set by `prepare`): rows, write positions, window, mask.
        self.rows = torch.zeros(0, dtype=torch.long, device=self.device)
        self.write = self.rows[:, None]
        self.mask = torch.zeros(0, 1, 1, 0, dtype=torch.bool, device=self.device)
        self.folded_mask = self.mask
        self.span, self.prefix = 0, False

    def __getitem__(self, layer: int) -> LayerCache:
        return LayerCache(self, layer)

    def prepare(
        self, rows: torch.Tensor, positions: torch.Tensor, write: torch.Tensor, span: int
    ) -> None:
        """Set the pass: rows (B,) slots, positions (B, T) rotary, write (B, T), window span.

        Allocates nothing on the host side and never syncs, so it can run inside a CUDA graph.
        """
        self.rows, self.write, self.span = rows, write, span
        # A query at position p sees the keys at 0..p of its own row (causal, per row).
        self.mask = torch.arange(span, device=self.device) <= positions[:, None, :, None]
        B, T = positions.shape
        self.folded_mask = (
            self.mask[:, :, None].expand(B, 1, self.groups, T, span).reshape(B, 1, -1, span)
        )

    def window(self, ends: Sequence[int]) -> int:
        """The read window (a bucket) for rows that reach positions up to max(ends) - 1."""
        return bucket(max(ends), self.max_seq_len, MIN_SPAN)


def hidden_forward(model, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache):
    """The model's blocks with the cache: tokens (B, T) -> final hidden states (B, T, D).

    The same blocks as `Llama.forward` without its host-side length check (the caller checks
    lengths on the host: a device sync here would stop CUDA graph capture) and without the
    output head, so the caller applies it only to the positions it needs.
    """
    x = model.tok_embeddings(tokens)
    for i, block in enumerate(model.layers.values()):
        x = block(x, model.rope, positions, cache[i], None)
    return x


def head(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and output head, logits in fp32."""
    return model.logits(hidden).float()


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the GPU: a copy from pageable
    memory would wait for every kernel queued before it, pinned memory does not."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DecodeRunner:
    """One decode step over the first B slots: eager, or replayed from a CUDA graph per
    (batch bucket, window bucket) on CUDA.

    `__call__(tokens, positions)` takes one token and its position per slot 0..n-1 (None for
    a slot that does not decode this step: it is padded) and returns logits (B, V) fp32 for
    B >= n rows, row i = slot i. The returned tensor is reused by the next call.
    """

    def __init__(self, model, cache: KVCache, cuda_graphs: bool = True) -> None:
        self.model, self.cache = model, cache
        self.graphs_on = cuda_graphs and cache.device.type == "cuda"
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None

    def __call__(self, tokens: Sequence[int | None], positions: Sequence[int | None]):
        c = self.cache
        B = bucket(len(tokens), c.slots)
        ends = [p + 1 for p in positions if p is not None]
        span = c.window(ends)
        pad = B - len(tokens)
        ids = [0 if t is None else t for t in tokens] + [0] * pad
        pos = [0 if p is None else p for p in positions] + [0] * pad
        write = [c.scratch if p is None else p for p in positions] + [c.scratch] * pad
        host = host_to_device([ids, pos, write], torch.long, c.device)  # (3, B): one copy
        if not self.graphs_on:
            return self._step(host, span)
        key = (B, span)
        if key not in self.graphs:
            self.graphs[key] = self._capture(B, span)
        graph, static_in, static_out, _ = self.graphs[key]
        static_in.copy_(host, non_blocking=True)
        graph.replay()
        return static_out

    def _step(self, host: torch.Tensor, span: int) -> torch.Tensor:
        ids, pos, write = host[0, :, None], host[1, :, None], host[2, :, None]  # (B, 1) each
        B = ids.shape[0]
        c = self.cache
        c.prepare(torch.arange(B, device=c.device), pos, write, span)
        c.prefix = True
        return head(self.model, hidden_forward(self.model, ids, pos, c)[:, -1])

    def _capture(self, B: int, span: int):
        """Record one step of this shape (after a warm-up on a side stream, as torch's CUDA
        graph notes ask: lazy initialisations must not happen during capture)."""
        static_in = torch.zeros(3, B, dtype=torch.long, device=self.cache.device)
        static_in[2].fill_(self.cache.scratch)  # the warm-up writes only to the scratch column
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(static_in, span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # thread_local: another thread's CUDA work meanwhile (the drift scorer shares the GPU)
        # neither breaks the capture nor is captured.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self._step(static_in, span)
        # The per-pass tensors made during capture (rows, write positions, masks) are the
        # graph's buffers: kept alive, their memory is never handed to another capture.
        c = self.cache
        return graph, static_in, static_out, (c.rows, c.write, c.mask, c.folded_mask)
