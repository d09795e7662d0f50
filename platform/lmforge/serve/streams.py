"""Choices as streams: the model backends the API talks to, and one request's choices with
its concurrency slot, deadline and metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from lmforge.model.generate import SamplingParams
from lmforge.model.special import SpecialTokens
from lmforge.serve.config import ANONYMOUS, DriftConfig, LimitsConfig
from lmforge.serve.drift import DriftScorer, ServedModelInfo
from lmforge.serve.engine import Engine, EngineOverloaded, Output
from lmforge.serve.protocol import APIError


class Backend(Protocol):
    """A served model as the API sees it: its tokenizer, special tokens and chat template,
    context length and token stream."""

    name: str
    tokenizer: Any
    special: SpecialTokens
    max_seq_len: int

    def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Output]: ...

    async def healthy(self) -> bool: ...


class LocalBackend:
    """An Engine in this process."""

    def __init__(
        self, name: str, engine: Engine, info: ServedModelInfo | None = None, drift=None
    ) -> None:
        self.name, self.engine = name, engine.start()
        self.drift = DriftScorer(engine, drift or DriftConfig())
        self.tokenizer, self.max_seq_len = engine.tokenizer, engine.max_seq_len
        self.special = engine.special
        self.info = info or ServedModelInfo()

    def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        return self.engine.stream(prompt, params)

    async def score(self, text: str) -> float | None:
        """The model's bits per byte on `text` (drift), in a thread beside the engine's."""
        return await asyncio.to_thread(self.drift, text, self.special.prefix_id)

    async def healthy(self) -> bool:
        return self.engine.healthy()


class Slot:
    """One of the replica's `max_concurrent_requests` generating requests: 429 + Retry-After
    when none is free. `reserved` tokens are taken from the key's rate when it is taken; what
    the request did not use (`used`) is given back when it is released. (The key's requests
    in flight are counted by the intake, which holds them from before the body is read.)"""

    def __init__(self, state, key: str = ANONYMOUS, reserved: int = 0) -> None:
        if state.inflight >= state.limits.max_concurrent_requests:
            raise overloaded(
                429,
                f"too many concurrent requests (limit {state.limits.max_concurrent_requests})",
                state.limits,
            )
        state.quotas.take(key, reserved)
        self.state, self.held = state, True
        self.key, self.reserved, self.used = key, reserved, 0
        state.inflight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.inflight -= 1
            self.state.quotas.give_back(self.key, self.reserved - self.used)


# ---------------------------------------------------------------- one choice, with limits


class Generation:
    """The choices of one request: opened together, timed out together, metered."""

    def __init__(self, app_state, backend: Backend, route: str, slot: Slot) -> None:
        self.state, self.backend, self.route = app_state, backend, route
        # The concurrency slot is freed when the last choice ends, however it ends: also when
        # a client leaves before its stream was ever read (the event loop then closes them).
        self.slot, self.open_choices = slot, 0
        self.start = time.monotonic()
        self.deadline = self.start + app_state.limits.request_timeout_s

    def finished(self) -> None:
        """Record the end-to-end latency of a request that completed."""
        latency = self.state.metrics.latency.labels(self.backend.name, self.route)
        latency.observe(time.monotonic() - self.start)

    async def open(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[AsyncIterator]:
        """Start every choice and wait for its first output, so that overload and timeouts
        before the first token are proper HTTP errors rather than mid-stream ones."""
        gens = [self._outputs(ids, params) for ids, params in jobs]
        self.open_choices = len(gens)
        firsts = await asyncio.gather(*(anext(g) for g in gens), return_exceptions=True)
        errors = [e for e in firsts if isinstance(e, BaseException)]
        if errors:
            await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
            raise errors[0]
        return [_prepend(first, g) for first, g in zip(firsts, gens, strict=True)]

    async def _outputs(self, ids: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        m, model = self.state.metrics, self.backend.name
        m.prompt_tokens.labels(model).inc(len(ids))
        self.slot.used += len(ids)
        gauge = m.waiting.labels(model)
        gauge.inc()
        stream = self.backend.generate(ids, params)
        try:
            while True:
                out = await self._next(stream)
                if out is None:
                    return
                if gauge is m.waiting.labels(model):
                    gauge.dec()
                    gauge = m.running.labels(model)
                    gauge.inc()
                    m.ttft.labels(model).observe(time.monotonic() - self.start)
                if out.tokens:
                    self.slot.used += len(out.tokens)
                    m.generation_tokens.labels(model).inc(len(out.tokens))
                    m.batch_size.labels(model).observe(out.batch_size)
                if out.finish_reason in ("stop", "length"):
                    m.completion_length.labels(model).observe(out.completion_tokens)
                if out.finish_reason == "error":
                    raise APIError(500, out.error or "generation failed", type="server_error")
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            gauge.dec()
            self.open_choices -= 1
            if self.open_choices == 0:
                self.slot.release()
            await stream.aclose()  # cancels the request in the engine if it is unfinished

    async def _next(self, stream) -> Output | None:
        limits: LimitsConfig = self.state.limits
        try:
            return await asyncio.wait_for(anext(stream), max(self.deadline - time.monotonic(), 0))
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise APIError(
                504,
                f"the request did not finish within {limits.request_timeout_s:g} s",
                type="timeout_error",
                code="timeout",
            ) from None
        except EngineOverloaded as e:
            raise overloaded(503, f"model {self.backend.name} is overloaded: {e}", limits) from None


async def _prepend(first: Output, rest: AsyncIterator[Output]) -> AsyncIterator[Output]:
    try:
        yield first
        if first.finish_reason is None:
            async for out in rest:
                yield out
    finally:
        await rest.aclose()


async def merge(gens: list[AsyncIterator[Output]]) -> AsyncIterator[tuple[int, Output]]:
    """Interleave several choices' outputs as they come, tagged with the choice index."""
    if len(gens) == 1:  # the common case: no pump task and queue hop per token
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator[Output]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def overloaded(status: int, message: str, limits: LimitsConfig) -> APIError:
    return APIError(
        status,
        message,
        type="overloaded_error" if status == 503 else "rate_limit_error",
        code="overloaded" if status == 503 else "too_many_requests",
        headers={"Retry-After": str(limits.retry_after_s)},
    )


async def collect_all(gens: list[AsyncIterator[Output]]) -> list[list[Output]]:
    async def collect(gen):
        return [out async for out in gen]

    tasks = [asyncio.create_task(collect(g)) for g in gens]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
