"""Prompt drift: how surprised the served model is by what users send, against validation data.

A sample of prompts is scored by the model itself (next-token loss over every prompt token,
as bits per UTF-8 byte, the unit of `val_bpb`), off the request's path: the API hands a prompt
to `DriftMonitor.offer`, a bounded queue, and a background task scores it on the model's
replica, where a `DriftScorer` keeps it from competing with decoding (it waits for the engine
to be idle, and stays within a token budget) and scores in the engine's dtype (bf16 on a GPU) without a
full fp32 copy of the logits. The rolling mean over the last `window` prompts, divided by the artifact's validation
bits per byte, is `lmforge_drift_ratio`: about 1 while traffic looks like the training data,
higher when it drifts away (another language, another domain, garbage).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge import storage
from lmforge.serve.requestlog import sampled

log = logging.getLogger(__name__)
EOS = "<|eos|>"  # precedes every document in training: the context a prompt is scored after


@dataclass
class ServedModelInfo:
    """What serving reports of an artifact: its version id and validation bits per byte."""

    version: str | None = None
    val_bpb: float | None = None


def served_model_info(directory: str, val_bpb: float | None = None) -> ServedModelInfo:
    """Version and validation bpb of an artifact dir: `val_bpb` (a config override) first,
    then the lineage in version.json, then the run's `train_summary.json` (`<artifact>/..`)."""
    from lmforge.model.artifact import read_version

    lineage = read_version(directory)
    if val_bpb is None and isinstance(lineage.get("val_bpb"), int | float):
        val_bpb = float(lineage["val_bpb"])
    if val_bpb is None:
        parent = directory.rstrip("/").rsplit("/", 1)[0] if "/" in directory.rstrip("/") else "."
        summary = storage.join(parent, "train_summary.json")
        if storage.exists(summary):
            try:
                value = storage.read_json(summary).get("val_bpb")
            except (ValueError, AttributeError):
                value = None
            val_bpb = float(value) if isinstance(value, int | float) else None
    return ServedModelInfo(lineage["version"], val_bpb)


def prompt_bits_per_byte(model, tokenizer, text: str, prefix: int | None = None) -> float | None:
    """Bits per byte of `text` under `model`: every token predicted, the first after `prefix`
    (the artifact's SpecialTokens.prefix_id; default <|eos|>, as documents are in lmforge's
    training). None for an empty text. Texts longer than the context are scored on their first
    `max_seq_len - 1` tokens (and those tokens' bytes)."""
    ids = prompt_ids(model, tokenizer, text)
    return bits_per_byte(model, tokenizer, ids, prefix) if ids else None


def prompt_ids(model, tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids[: model.cfg.max_seq_len - 1]


# Positions whose logits are upcast to fp32 at a time: the loss never holds a (T, V) fp32
# copy (8b at 8k tokens: 4 GiB), only LOSS_CHUNK x V of it.
LOSS_CHUNK = 256


def bits_per_byte(model, tokenizer, ids: list[int], prefix: int | None = None) -> float:
    """Bits per byte of the tokens `ids`, scored in the model's own dtype (the serving
    engine's: bf16 on a GPU) with the loss summed in fp32.

    The input is the prefix and every token but the last, so the model computes logits only
    for positions that have a target (none for the last token, which predicts nothing here).
    """
    n_bytes = len(tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8"))
    eos = prefix if prefix is not None else tokenizer.token_to_id(EOS)
    device = next(model.parameters()).device
    inputs = torch.tensor([[eos if eos is not None else ids[0], *ids[:-1]]], device=device)
    targets = torch.tensor(ids, device=device)
    with torch.inference_mode():
        logits = model(inputs)[0]  # (T, V) in the model's dtype, T = len(ids)
        nats = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(ids), LOSS_CHUNK):
            chunk = logits[start : start + LOSS_CHUNK].float()
            nats += F.cross_entropy(chunk, targets[start : start + LOSS_CHUNK], reduction="sum")
    return float(nats) / math.log(2) / max(n_bytes, 1)


class TokenBudget:
    """At most `tokens_per_s` scored tokens per second over any stretch of time: a bucket that
    refills at that rate up to one second's worth. A prompt is admitted while the bucket is
    not empty and may take it below zero (a prompt longer than one second's worth is scored
    whole, then the next waits until the debt is refilled)."""

    def __init__(self, tokens_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = tokens_per_s, clock
        self.level, self.last = tokens_per_s, clock()

    def take(self, tokens: int) -> bool:
        now = self.clock()
        self.level = min(self.rate, self.level + (now - self.last) * self.rate)
        self.last = now
        if self.level <= 0:
            return False
        self.level -= tokens
        return True


class DriftScorer:
    """Scores prompts on a replica's engine so that scoring never competes with decoding: it
    waits (up to `idle_wait_s`) until the engine has no request running or waiting, and stays
    within `max_tokens_per_s` scored tokens. A prompt refused is not scored (None), and
    counted in `refused`."""

    POLL_S = 0.01  # how often a waiting scorer looks at the engine's queues

    def __init__(
        self,
        engine,
        cfg,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.engine, self.idle_wait_s = engine, cfg.idle_wait_s
        self.clock, self.sleep = clock, sleep
        self.budget = TokenBudget(cfg.max_tokens_per_s, clock)
        self.scored_tokens = 0
        self.refused = {"busy": 0, "budget": 0}
        self.lock = threading.Lock()  # scorings run in threads; one at a time

    def busy(self) -> bool:
        """Requests running or queued in the engine: two length reads, no lock or device sync."""
        engine = self.engine
        return bool(getattr(engine, "num_running", 0) or len(getattr(engine, "waiting", ())))

    def wait_idle(self) -> bool:
        if self.idle_wait_s <= 0:
            return True
        deadline = self.clock() + self.idle_wait_s
        while self.busy():
            if self.clock() >= deadline:
                return False
            self.sleep(self.POLL_S)
        return True

    def __call__(self, text: str, prefix: int | None = None) -> float | None:
        model, tokenizer = self.engine.model, self.engine.tokenizer
        ids = prompt_ids(model, tokenizer, text)
        if not ids:
            return None
        with self.lock:
            if not self.wait_idle():
                self.refused["busy"] += 1
                return None
            if not self.budget.take(len(ids)):
                self.refused["budget"] += 1
                return None
            self.scored_tokens += len(ids)
            return bits_per_byte(model, tokenizer, ids, prefix)


Scorer = Callable[[str], Awaitable[float | None]]


class DriftMonitor:
    """Rolling prompt bits per byte per model, and its ratio to the validation bits per byte,
    kept in the `ServeMetrics` gauges (when given)."""

    def __init__(self, cfg, metrics=None) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.windows: dict[str, deque[float]] = {}
        self.validation: dict[str, float] = {}
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.skipped = 0  # prompts not scored because the queue was full
        self.scored = 0

    def set_validation(self, model: str, val_bpb: float | None) -> None:
        if val_bpb is not None:
            self.validation[model] = val_bpb
            if self.metrics is not None:
                self.metrics.validation_bpb.labels(model).set(val_bpb)

    def offer(self, key: str, model: str, text: str, scorer: Scorer) -> bool:
        """Queue a prompt for scoring if `key` (the completion id) is in the sample and the
        queue has room; never waits. Call from the event loop."""
        if not text or not sampled(f"drift:{key}", self.cfg.sample_rate):
            return False
        if self.queue is None:
            self.queue = asyncio.Queue(maxsize=self.cfg.queue_size)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._work())
        try:
            self.queue.put_nowait((model, text, scorer))
        except asyncio.QueueFull:
            self.skipped += 1
            return False
        return True

    async def _work(self) -> None:
        while True:
            model, text, scorer = await self.queue.get()
            try:
                bpb = await scorer(text)
                if bpb is not None and math.isfinite(bpb):
                    self.observe(model, bpb)
            except Exception as e:  # a failed score costs one sample, never the API
                log.warning("drift: scoring a prompt of %s failed: %s", model, e)
            finally:
                self.queue.task_done()

    async def drain(self) -> None:
        """Wait until every queued prompt is scored (tests, shutdown)."""
        if self.queue is not None:
            await self.queue.join()

    def close(self) -> None:
        """Stop scoring (app shutdown); prompts still queued are dropped."""
        if self.task is not None:
            self.task.cancel()

    def observe(self, model: str, bpb: float) -> None:
        window = self.windows.setdefault(model, deque(maxlen=self.cfg.window))
        window.append(bpb)
        self.scored += 1
        if self.metrics is not None:
            self.metrics.prompt_bpb.labels(model).set(self.prompt_bpb(model))
            ratio = self.ratio(model)
            if ratio is not None:
                self.metrics.drift_ratio.labels(model).set(ratio)

    def prompt_bpb(self, model: str) -> float | None:
        window = self.windows.get(model)
        return sum(window) / len(window) if window else None

    def ratio(self, model: str) -> float | None:
        """Rolling prompt bpb / validation bpb; None until both are known."""
        current, val = self.prompt_bpb(model), self.validation.get(model)
        return None if current is None or not val else current / val
