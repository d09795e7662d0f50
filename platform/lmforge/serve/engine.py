"""Continuous batching: one model, many requests, one decoding step at a time.

Every `step()` first admits waiting requests into free cache slots (each prefilled alone, so no
padding), then samples one token for every running request and runs one batched forward pass
of the last tokens. Requests join and leave the running batch at every step: a new request's
first token does not wait for the batch to finish, and a finished or cancelled one frees its
slot at once. `start()` runs steps in a background thread; `stream()` is the asyncio side.

No Ray here: the engine runs (and is tested and benchmarked) in one process; lmforge.serve.app
puts one engine in each Serve replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from lmforge.model.generate import (
    KVCache,
    SamplingParams,
    TextTracker,
    forward,
    make_generator,
    sample_batch,
    stop_ids,
    token_logprobs,
)
from lmforge.model.special import LMFORGE, SpecialTokens

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """The waiting queue is full: the caller should retry later (HTTP 503 + Retry-After)."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """What one step produced for one request (streamed as it comes)."""

    tokens: list[int]  # new completion tokens
    text: str  # new completion text (stop strings and incomplete characters held back)
    logprobs: list[TokenLogprob] | None = None  # per new token, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # once, first, with echo + logprobs
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 0  # requests running in the step that produced this


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None]  # called from the engine thread
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    last_logits: torch.Tensor | None = None
    text: TextTracker | None = None
    gen: torch.Generator | None = None
    started_step: int = -1  # the engine step at which its prefill ran


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 16,
        max_waiting: int = 256,
        max_seq_len: int | None = None,
        special: SpecialTokens = LMFORGE,
    ) -> None:
        self.model, self.tokenizer, self.special = model, tokenizer, special
        param = next(model.parameters())
        self.device = param.device
        self.max_seq_len = min(max_seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.cache = KVCache(
            model.cfg, max_batch_size, self.device, param.dtype, max_seq_len=self.max_seq_len
        )
        self.free = list(range(max_batch_size))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
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
        """Admit, sample one token per running request, decode; return how many still run.

        What can fail for one request alone (its prefill, its sampling params, its text) fails
        that request only and frees its slot; an exception out of here means the batch itself
        is broken (the batched forward pass)."""
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
                request.slot = self.free.pop()
                admitted.append(request)
        for request in admitted:
            self._guarded(self._prefill, request)
        batch = [r for r in self.running if not r.cancelled]
        if batch:
            for request, token in zip(batch, self._sample(batch), strict=True):
                if token is not None:
                    self._guarded(self._next_token, request, token, len(batch))
        with self._cond:
            self._drop_cancelled()
        if self.running:
            logits = forward(
                self.model,
                self.cache,
                [r.slot for r in self.running],
                [[r.tokens[-1]] for r in self.running],
                [len(r.prompt) + len(r.tokens) - 1 for r in self.running],
            )[:, -1]
            for request, row in zip(self.running, logits, strict=True):
                request.last_logits = row
        self.steps += 1
        return len(self.running)

    def _sample(self, batch: list[Request]) -> list[int | None]:
        """One token per request, in one batched call; if that call fails, row by row, so
        that only the rows that fail alone are failed (None)."""
        try:
            logits = torch.stack([r.last_logits for r in batch])  # (B, V)
            return sample_batch(logits, [r.params for r in batch], [r.gen for r in batch])
        except Exception:
            if len(batch) == 1:
                self._fail_one(batch[0], "sampling")
                return [None]
        tokens: list[int | None] = []
        for request in batch:
            try:
                row = request.last_logits[None]
                tokens.append(sample_batch(row, [request.params], [request.gen])[0])
            except Exception:
                self._fail_one(request, "sampling")
                tokens.append(None)
        return tokens

    def _guarded(self, fn: Callable, request: Request, *args) -> None:
        try:
            fn(request, *args)
        except Exception:
            self._fail_one(request, fn.__name__.strip("_"))

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
        p = request.params
        request.started_step = self.steps
        request.text = TextTracker(self.tokenizer, p.stop)
        request.gen = make_generator(p.seed, self.device)
        logits = forward(self.model, self.cache, [request.slot], [request.prompt], [0])[0]
        self.running.append(request)
        if p.echo and p.logprobs is not None:
            prompt = torch.tensor(request.prompt, device=logits.device)
            picked, tops = token_logprobs(logits[:-1], prompt[1:], p.logprobs)
            first = TokenLogprob(request.prompt[0], None, [])
            rest = [TokenLogprob(*x) for x in zip(request.prompt[1:], picked, tops, strict=True)]
            if p.max_tokens > 0:
                request.on_output(Output([], "", prompt_logprobs=[first, *rest]))
            else:
                self._finish(request, "length", Output([], "", prompt_logprobs=[first, *rest]))
                return
        if p.max_tokens <= 0:
            self._finish(request, "length", Output([], ""))
            return
        request.last_logits = logits[-1]

    def _next_token(self, request: Request, token: int, batch: int) -> None:
        p = request.params
        request.tokens.append(token)
        out = Output([token], "", batch_size=batch)
        if p.logprobs is not None:
            picked, tops = token_logprobs(
                request.last_logits[None], torch.tensor([token], device=self.device), p.logprobs
            )
            out.logprobs = [TokenLogprob(token, picked[0], tops[0])]
        if token in stop_ids(p, self.special):
            out.text = request.text.flush()
            return self._finish(request, "stop", out)
        out.text = request.text.add(token)
        if request.text.stopped:
            return self._finish(request, "stop", out)
        if (
            len(request.tokens) >= p.max_tokens
            or len(request.prompt) + len(request.tokens) >= self.max_seq_len
        ):
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
            self.free.append(request.slot)
            request.slot = -1
        request.last_logits = None

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
    )
