"""Request limits, checked before any model work: sizes per request, and per API key the
requests in flight and a token rate, so one key cannot take the replica from the others
(keyed by the key's id, never the key; per API replica)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from lmforge.serve.config import LimitsConfig
from lmforge.serve.protocol import APIError


class TokenBucket:
    """`per_minute` tokens a minute, with a burst of one minute's worth; `clock` gives the
    time in seconds (monotonic)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self.clock = clock
        self.level, self.time = self.capacity, clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.time) * self.rate)
        self.time = now

    def take(self, tokens: int) -> float:
        """Take `tokens` now and return 0, or take nothing and return the seconds until they
        are there."""
        self._refill()
        if tokens <= self.level:
            self.level -= tokens
            return 0.0
        return (tokens - self.level) / self.rate

    def give_back(self, tokens: int) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + tokens)


class KeyQuotas:
    """Each key's requests in flight (held by the intake from admission, before the body is
    read, to the end of the response) and token bucket (LimitsConfig.key_*)."""

    def __init__(self, limits: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self.inflight: dict[str, int] = {}
        self.buckets: dict[str, TokenBucket] = {}

    def enter(self, key: str) -> None:
        """Count one more request of `key` in flight, or raise 429 when it holds its limit."""
        per_key = self.limits.key_max_concurrent_requests
        if per_key is not None and self.inflight.get(key, 0) >= per_key:
            raise rate_limited(
                f"too many concurrent requests with this API key (limit {per_key}); requests "
                "still sending their body count: retry when one ends, or raise "
                "limits.key_max_concurrent_requests",
                self.limits.retry_after_s,
            )
        self.inflight[key] = self.inflight.get(key, 0) + 1

    def leave(self, key: str) -> None:
        self.inflight[key] -= 1
        if not self.inflight[key]:
            del self.inflight[key]

    def take(self, key: str, tokens: int) -> None:
        """Take `tokens` (prompts plus every sequence's max_tokens) from the key's rate, or
        raise 429 with the Retry-After that would admit them."""
        rate = self.limits.key_tokens_per_minute
        if rate is None:
            return
        if tokens > rate:
            raise APIError(
                400,
                f"this request may use {tokens} tokens (prompts + n x max_tokens); the "
                f"quota of an API key is {rate} tokens per minute: lower max_tokens or n",
                param="max_tokens",
                code="quota_exceeded",
            )
        bucket = self.buckets.setdefault(key, TokenBucket(rate, self.clock))
        wait = bucket.take(tokens)
        if wait:
            raise rate_limited(
                f"the token quota of this API key ({rate} per minute) is used up; this "
                f"request needs {tokens}",
                max(self.limits.retry_after_s, math.ceil(wait)),
            )

    def give_back(self, key: str, unused_tokens: int) -> None:
        if unused_tokens > 0 and key in self.buckets:
            self.buckets[key].give_back(unused_tokens)


def rate_limited(message: str, retry_after_s: int) -> APIError:
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="too_many_requests",
        headers={"Retry-After": str(retry_after_s)},
    )


def check_lengths(
    backend, limits: LimitsConfig, n_prompt: int, max_tokens: int, param: str
) -> None:
    """A prompt within the limit and the model's context, with room for max_tokens."""
    cap = min(limits.max_prompt_tokens or backend.max_seq_len, backend.max_seq_len)
    if n_prompt > cap:
        raise APIError(
            400,
            f"the prompt has {n_prompt} tokens; the limit is {cap}",
            param=param,
            code="context_length_exceeded",
        )
    if n_prompt + max_tokens > backend.max_seq_len:
        raise APIError(
            400,
            f"this model's maximum context length is {backend.max_seq_len} tokens, but "
            f"{n_prompt + max_tokens} were requested ({n_prompt} in the prompt, {max_tokens} for "
            "the completion); shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )


def check_counts(limits: LimitsConfig, body, max_tokens: int, prompts: int = 1) -> None:
    """n, sequences (prompts x n), max_tokens and stop strings of a request within limits."""
    n, stop = body.n, body.stop_list()
    if n > limits.max_n:
        raise APIError(400, f"n is {n}; the limit is {limits.max_n}", param="n")
    if prompts * n > limits.max_sequences:
        raise APIError(
            400,
            f"{prompts} prompts x n={n} = {prompts * n} sequences; the limit per request is "
            f"{limits.max_sequences}: send fewer prompts or a lower n",
            param="n",
        )
    if max_tokens > limits.max_tokens:
        raise APIError(
            400, f"max_tokens is {max_tokens}; the limit is {limits.max_tokens}", param="max_tokens"
        )
    if len(stop) > limits.max_stop:
        raise APIError(
            400, f"{len(stop)} stop strings; the limit is {limits.max_stop}", param="stop"
        )
    longest = max(map(len, stop), default=0)
    if longest > limits.max_stop_chars:
        raise APIError(
            400,
            f"a stop string has {longest} characters; the limit is {limits.max_stop_chars}",
            param="stop",
        )


# Characters per token a prompt may average before it is refused unread: far above what any
# tokenizer gives on text (about 4), so that only prompts that cannot fit are refused.
CHARS_PER_TOKEN = 32


def check_chars(backend, limits: LimitsConfig, n_chars: int, param: str) -> None:
    """Refuse a prompt text too long to fit before encoding it (encoding costs its length)."""
    tokens = min(limits.max_prompt_tokens or backend.max_seq_len, backend.max_seq_len)
    cap = limits.max_prompt_chars or CHARS_PER_TOKEN * tokens
    if n_chars > cap:
        raise APIError(
            400,
            f"the prompt has {n_chars} characters; the limit is {cap} "
            f"(limits.max_prompt_chars, for a {tokens}-token prompt limit): shorten it",
            param=param,
            code="context_length_exceeded",
        )
