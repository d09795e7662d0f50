"""Continuous batching: one model, many requests, one decoding step at a time.

Every `step()` admits waiting requests into free cache slots, prefills prompt chunks of the
admitted ones together (up to `max_prefill_tokens` prompt tokens per step, so a long prompt is
spread over steps instead of stalling every running request), samples one token for every
request whose logits are ready (one batched call, one host transfer of the tokens), launches
the next decode step, and only then does the host work of the tokens just sampled
(incremental detokenization, stop strings, streaming), while the device computes. Requests join
and leave the running batch at every step: a new request's first token does not wait for the
batch to finish, and a finished or cancelled one frees its slot at once.

The KV cache gets the slots that fit in its memory budget (see `kv_budget`), at most
`max_batch_size`. A decode step runs over the first B slots (B a bucket; new requests take the
lowest free slot, idle slots in range are padding) and reads the cache in place, so each
(B, window) shape is captured once in a CUDA graph on a GPU (lmforge.model.kvcache).

`start()` runs steps in a background thread; `stream()` is the asyncio side. No Ray here: the
engine runs (and is tested and benchmarked) in one process; lmforge.serve.app puts one engine
in each Serve replica.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable

import torch

from lmforge.model.generate import (
    SamplingParams,
    TextTracker,
    make_generator,
    sample_tokens,
    stop_ids,
    token_logprobs,
)
from lmforge.model.kvcache import (
    DecodeRunner,
    KVCache,
    activation_bytes,
    fit_slots,
    host_to_device,
    kv_budget,
    kv_bytes_per_token,
)
from lmforge.model.special import LMFORGE, SpecialTokens
from lmforge.serve.prefill import ChunkedPrefill
from lmforge.serve.records import EngineOverloaded, Output, Request, TokenLogprob

log = logging.getLogger(__name__)


class Engine(ChunkedPrefill):
    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 64,
        max_waiting: int = 256,
        max_seq_len: int | None = None,
        special: SpecialTokens = LMFORGE,
        *,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_prefill_tokens: int = 2048,
        cuda_graphs: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.special = model, tokenizer, special
        param = next(model.parameters())
        self.device = param.device
        self.max_seq_len = min(max_seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.max_prefill_tokens = max_prefill_tokens
        reserve = activation_bytes(model.cfg, param.dtype, max_prefill_tokens, max_batch_size)
        budget = kv_budget(self.device, kv_cache_bytes, gpu_memory_utilization, reserve)
        slots = fit_slots(model.cfg, param.dtype, self.max_seq_len, budget, max_batch_size)
        self.max_batch_size, self.max_waiting = slots, max_waiting
        self.cache = KVCache(
            model.cfg, slots, self.device, param.dtype, max_seq_len=self.max_seq_len
        )
        self.kv_cache_bytes = 2 * self.cache.k.numel() * self.cache.k.element_size()
        log.info(
            "KV cache: %d slots x %d tokens, %.2f GiB (%d bytes per token)",
            slots,
            self.max_seq_len,
            self.kv_cache_bytes / 2**30,
            kv_bytes_per_token(model.cfg, param.dtype),
        )
        self.decoder = DecodeRunner(model, self.cache, cuda_graphs=cuda_graphs)
        self.free = list(range(slots))  # a heap: the lowest free slot first
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pending: list[tuple[Request, int]] = []  # decoded rows: (request, row) in `logits`
        self.logits: torch.Tensor | None = None  # the last decode step's (B, V), maybe in flight
        self.steps = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Set when a batched step itself failed: the replica is then unhealthy for good (its
        # cache or device may be in any state) and Serve's health check has it replaced.
        self.last_error: str | None = None

    # ------------------------------------------------------------ requests in and out

    def submit(self, request: Request) -> Request:
        if len(request.prompt) + max(request.params.max_tokens, 0) > self.max_seq_len:
            raise ValueError(
                f"{len(request.prompt)} prompt tokens + {request.params.max_tokens} max_tokens "
                f"exceed the context length {self.max_seq_len}"
            )
        if not request.prompt:
            raise ValueError("the prompt is empty")
        with self._cond:
            if self._stopping:
                raise EngineOverloaded("the engine is shutting down")
            if self.last_error is not None:
                raise EngineOverloaded(f"the engine is down ({self.last_error})")
            # Free slots are claimed at the next step, so they count as room in the queue.
            if len(self.waiting) >= self.max_waiting + len(self.free):
                raise EngineOverloaded(
                    f"all {self.max_batch_size} slots are busy and {len(self.waiting)} requests wait"
                )
            self.waiting.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """The request leaves at the next step boundary (its slot is freed then)."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def num_running(self) -> int:
        return len(self.running)

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        """Submit a request and yield its outputs; closing the iterator cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        request = Request(
            list(prompt), params, lambda o: loop.call_soon_threadsafe(queue.put_nowait, o)
        )
        self.submit(request)
        done = False
        try:
            while not done:
                out = await queue.get()
                done = out.finish_reason is not None
                yield out
        finally:
            if not done:
                self.cancel(request)

    # ------------------------------------------------------------ the loop

    def step(self) -> int:
        """Admit, prefill, sample one token per ready request, launch the next decode, then
        stream what was sampled; return how many requests still run.

        What can fail for one request alone (its setup, its prefill, its sampling params, its
        text) fails that request only and frees its slot; an exception out of here means the
        batch itself is broken (the batched decode step)."""
        with self._cond:
            self._drop_cancelled()
            admitted = []
            # The tenant (API key) with the fewest running sequences goes first, FIFO among
            # its own: one client's fan-out cannot take every free slot while others wait.
            running = Counter(r.params.tenant for r in self.running)
            while self.waiting and self.free:
                request = min(self.waiting, key=lambda r: running[r.params.tenant])
                self.waiting.remove(request)
                running[request.params.tenant] += 1
                request.slot = heapq.heappop(self.free)
                request.started_step = self.steps
                admitted.append(request)
        for request in admitted:
            self._guarded(self._prefill, request)
        batch, parts = [], []
        decoded = [(r, row) for r, row in self.pending if r.slot >= 0 and not r.cancelled]
        if decoded:
            rows = host_to_device([row for _, row in decoded], torch.long, self.device)
            parts.append(self.logits.index_select(0, rows))
            batch += [r for r, _ in decoded]
        self.pending, self.logits = [], None
        for request, row in self._prefill_chunks():
            batch.append(request)
            parts.append(row[None])
        news = []
        if batch:
            logits = torch.cat(parts) if len(parts) > 1 else parts[0]  # (N, V)
            for i, (request, token) in enumerate(
                zip(batch, self._sample(batch, logits), strict=True)
            ):
                if token is not None:
                    news.append(self._guarded(self._take, request, token, logits[i], len(batch)))
        news = [n for n in news if n is not None]
        with self._cond:
            self._drop_cancelled()
        self._launch([r for r, _, reason in news if reason is None and not r.cancelled])
        # Host work of the tokens just sampled, while the device runs the step just launched.
        for request, out, reason in news:
            self._guarded(self._emit, request, out, reason)
        self.steps += 1
        return len(self.running)

    def _launch(self, requests: list[Request]) -> None:
        """Start the decode step of `requests` (their last token), without waiting for it."""
        if not requests:
            return
        width = max(r.slot for r in requests) + 1
        tokens: list[int | None] = [None] * width
        positions: list[int | None] = [None] * width
        for r in requests:
            tokens[r.slot] = r.tokens[-1]
            positions[r.slot] = len(r.prompt) + len(r.tokens) - 1
        self.logits = self.decoder(tokens, positions)  # (B, V), row = slot
        self.pending = [(r, r.slot) for r in requests]

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> list[int | None]:
        """One token per request, in one batched call and one host transfer; if that call
        fails, row by row, so that only the rows that fail alone are failed (None)."""
        try:
            return sample_tokens(logits, [r.params for r in batch], [r.gen for r in batch]).tolist()
        except Exception:
            if len(batch) == 1:
                self._fail_one(batch[0], "sampling")
                return [None]
        tokens: list[int | None] = []
        for i, request in enumerate(batch):
            try:
                row = logits[i : i + 1]
                tokens.append(sample_tokens(row, [request.params], [request.gen]).item())
            except Exception:
                self._fail_one(request, "sampling")
                tokens.append(None)
        return tokens

    def _guarded(self, fn: Callable, request: Request, *args):
        try:
            return fn(request, *args)
        except Exception:
            self._fail_one(request, fn.__name__.strip("_"))
            return None

    def _fail_one(self, request: Request, stage: str) -> None:
        """Fail one request (logged with its traceback) and give its slot back."""
        log.exception("request %s failed in %s", request.id, stage)
        error = f"generation failed in {stage}"
        self._release(request)
        try:  # the failure may be the callback itself (its event loop gone): nothing to tell
            request.on_output(Output([], "", finish_reason="error", error=error))
        except Exception:
            log.warning("request %s: its failure could not be delivered", request.id)

    def _prefill(self, request: Request) -> None:
        """Set up an admitted request: its text tracker and random stream; its prompt is then
        prefilled in chunks by the following steps' passes."""
        p = request.params
        request.text = TextTracker(self.tokenizer, p.stop)
        request.gen = make_generator(p.seed, self.device)
        self.running.append(request)

    def _take(self, request: Request, token: int, logits: torch.Tensor, batch: int):
        """The sampled token's bookkeeping before the next launch: whether the request goes on
        (a stop token or the length ends it; stop strings are seen later, in `_emit`)."""
        p = request.params
        request.tokens.append(token)
        out = Output([token], "", batch_size=batch)
        if p.logprobs is not None:
            chosen = torch.tensor([token], device=self.device)
            picked, tops = token_logprobs(logits[None], chosen, p.logprobs)
            out.logprobs = [TokenLogprob(token, picked[0], tops[0])]
        reason = None
        if token in stop_ids(p, self.special):
            reason = "stop"
        elif (
            len(request.tokens) >= p.max_tokens
            or len(request.prompt) + len(request.tokens) >= self.max_seq_len
        ):
            reason = "length"
        return request, out, reason

    def _emit(self, request: Request, out: Output, reason: str | None) -> None:
        """Detokenize the new token (incrementally), check stop strings, stream the output."""
        if request.slot < 0:  # cancelled or failed meanwhile
            return
        if reason == "stop":  # a stop token: not part of the text
            out.text = request.text.flush()
            return self._finish(request, "stop", out)
        out.text = request.text.add(out.tokens[0])
        if request.text.stopped:
            return self._finish(request, "stop", out)
        if reason == "length":
            out.text += request.text.flush()
            return self._finish(request, "length", out)
        out.prompt_tokens, out.completion_tokens = len(request.prompt), len(request.tokens)
        request.on_output(out)

    def _finish(self, request: Request, reason: str, out: Output) -> None:
        out.finish_reason = reason
        out.prompt_tokens, out.completion_tokens = len(request.prompt), len(request.tokens)
        self._release(request)
        request.on_output(out)

    def _release(self, request: Request) -> None:
        """Give back the request's slot (once), whether or not it got to run."""
        if request in self.running:
            self.running.remove(request)
        if request.slot >= 0:
            heapq.heappush(self.free, request.slot)
            request.slot = -1

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            request.on_output(Output([], "", finish_reason="cancelled"))
        for request in [r for r in self.running if r.cancelled]:
            self._release(request)
            request.on_output(Output([], "", finish_reason="cancelled"))

    def _fail_all(self, message: str) -> None:
        with self._cond:
            victims = list(self.running) + list(self.waiting)
            self.waiting.clear()
        for request in victims:
            self._release(request)
            request.on_output(Output([], "", finish_reason="error", error=message))

    # ------------------------------------------------------------ background thread

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.running or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self.waiting or self.running):
                    return
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as e:  # the batch itself is broken: the replica must go
                log.exception("engine step failed; the engine is now unhealthy")
                self.last_error = f"{type(e).__name__}: {e}"
                self._fail_all(f"generation failed: {self.last_error}")

    def healthy(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and not self._stopping
            and self.last_error is None
        )

    def shutdown(self, drain_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `drain_s`, cancel the rest."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        deadline = time.monotonic() + drain_s
        while (self.running or self.waiting) and time.monotonic() < deadline and self._thread:
            time.sleep(0.05)
        for request in list(self.running) + list(self.waiting):
            self.cancel(request)
        if self._thread is not None:
            self._thread.join(timeout=5)


def load_engine(cfg) -> Engine:
    """The (not yet started) engine of a `ModelServeConfig`: artifact, device, dtype, batch."""
    from tokenizers import Tokenizer

    from lmforge import storage
    from lmforge.model.artifact import TOKENIZER, load_model, resolve_artifact
    from lmforge.model.special import load_special_tokens

    directory = resolve_artifact(cfg.artifact)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model = load_model(directory, device=device).to(getattr(torch, dtype))
    tokenizer = Tokenizer.from_str(storage.read_text(storage.join(directory, TOKENIZER)))
    return Engine(
        model,
        tokenizer,
        max_batch_size=cfg.max_batch_size,
        max_waiting=cfg.max_waiting,
        special=load_special_tokens(directory, tokenizer),
        kv_cache_bytes=None if cfg.kv_cache_gb is None else int(cfg.kv_cache_gb * 2**30),
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_prefill_tokens=cfg.max_prefill_tokens,
        cuda_graphs=cfg.cuda_graphs,
    )
