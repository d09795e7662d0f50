"""What the engine takes and hands out: requests, per-step outputs, token logprobs."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.model.generate import SamplingParams, TextTracker


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
    text: TextTracker | None = None
    gen: torch.Generator | None = None
    started_step: int = -1  # the engine step at which it was admitted
    prefilled: int = 0  # prompt tokens already in the cache
    prompt_lp: list[TokenLogprob] = field(default_factory=list)  # echo + logprobs, so far
