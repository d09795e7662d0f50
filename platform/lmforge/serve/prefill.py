"""The engine's prefill: admitted prompts in chunks, together, under a token budget per step.

A step prefills up to `max_prefill_tokens` prompt tokens, taken from the admitted requests in
admission order, in one forward pass (rows of different lengths are padded; padding writes
only to the cache's scratch column). A prompt longer than the budget is spread over steps, so
the running requests keep getting a token each step meanwhile. The output head runs only on
the positions needed: a prompt's last one (its first sampled token), and every one of a prompt
that asked for `echo` with `logprobs`.
"""

from __future__ import annotations

import torch

from lmforge.model.generate import forward, token_logprobs
from lmforge.serve.records import Output, Request, TokenLogprob


class ChunkedPrefill:
    """Mixed into `lmforge.serve.engine.Engine` (which provides the attributes used here)."""

    def _prefill_chunks(self) -> list[tuple[Request, torch.Tensor]]:
        """Prefill up to `max_prefill_tokens` prompt tokens of the admitted requests, in one
        pass; return (request, last-position logits (V,)) for each prompt now complete."""
        budget, chunks = self.max_prefill_tokens, []
        for request in self.running:
            todo = len(request.prompt) - request.prefilled
            if todo > 0 and not request.cancelled and budget > 0:
                chunks.append((request, min(todo, budget)))
                budget -= chunks[-1][1]
        if not chunks:
            return []
        try:
            results = self._prefill_pass(chunks)
        except Exception:  # one prompt may be what breaks the pass: fail only those that do
            results = []
            for chunk in chunks:
                try:
                    results += self._prefill_pass([chunk])
                except Exception:
                    self._fail_one(chunk[0], "prefill")
        ready = []
        for request, n, logits in results:
            got = self._guarded(self._after_prefill, request, n, logits)
            if got is not None:
                ready.append((request, got))
        return ready

    def _prefill_pass(self, chunks: list[tuple[Request, int]]):
        keep = []
        for request, n in chunks:
            complete = request.prefilled + n == len(request.prompt)
            echo = request.params.echo and request.params.logprobs is not None
            keep.append(list(range(n)) if echo else [n - 1] if complete else [])
        logits = forward(
            self.model,
            self.cache,
            [r.slot for r, _ in chunks],
            [r.prompt[r.prefilled : r.prefilled + n] for r, n in chunks],
            [r.prefilled for r, _ in chunks],
            keep=keep,
        )
        out, at = [], 0
        for (request, n), kept in zip(chunks, keep, strict=True):
            out.append((request, n, logits[at : at + len(kept)]))
            at += len(kept)
        return out

    def _after_prefill(self, request: Request, n: int, logits: torch.Tensor):
        """Book a prefilled chunk: prompt logprobs (echo), and when the prompt is complete the
        logits to sample its first token from (None while more chunks are to come)."""
        p, start = request.params, request.prefilled
        request.prefilled += n
        complete = request.prefilled == len(request.prompt)
        if p.echo and p.logprobs is not None:
            targets = request.prompt[start + 1 : start + n + 1]  # the last position has none
            chosen = torch.tensor(targets, device=self.device)
            picked, tops = token_logprobs(logits[: len(targets)], chosen, p.logprobs)
            request.prompt_lp += [TokenLogprob(*x) for x in zip(targets, picked, tops, strict=True)]
        if not complete:
            return None
        prompt_lp = None
        if p.echo and p.logprobs is not None:
            prompt_lp = [TokenLogprob(request.prompt[0], None, []), *request.prompt_lp]
        if p.max_tokens <= 0:
            self._finish(request, "length", Output([], "", prompt_logprobs=prompt_lp))
            return None
        if prompt_lp is not None:
            request.on_output(Output([], "", prompt_logprobs=prompt_lp))
        return logits[-1]
