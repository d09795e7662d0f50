"""Distributing requests over a Ray Data actor pool; each actor loads the model once.

The driver cuts the requests into batches before anything is distributed: requests sorted by
length (longest first, so padding is small and memory peaks early), `batch_size` per batch
(and at most `max_batch_tokens` padded tokens), generation requests apart. Unset, both are
fixed on CPU and sized by memory on GPU (`batching`: the free memory of an actor's share of a
GPU, probed once by a task on one, against the model's config; lmforge.eval.lm.batch_limits). A batch is one row of a Ray Data dataset, and an actor scores a whole
row in one call. So what each forward pass computes does not depend on how many actors there
are or which actor gets which row, and 1 actor and N actors give identical numbers (every actor
also uses the same number of torch threads).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from lmforge.eval.lm import CPU_BATCH_SIZE, CPU_BATCH_TOKENS, Scorer, batch_limits


def make_batches(
    requests: list[dict[str, Any]], batch_size: int, max_batch_tokens: int | None = None
) -> list[list[int]]:
    """Indices of the requests, grouped into batches (a pure function of the requests): at most
    `batch_size` sequences, and at most `max_batch_tokens` padded tokens per log-likelihood
    batch (the logits, batch x length x vocabulary, are what fills memory)."""

    def length(i: int) -> int:
        r = requests[i]
        if r["kind"] == "generate":
            return len(r["prompt"])
        return len(r["context"]) + len(r["continuation"])

    batches: list[list[int]] = []
    for kind in ("loglikelihood", "generate"):
        idx = [i for i, r in enumerate(requests) if r["kind"] == kind]
        idx.sort(key=lambda i: (-length(i), i))
        current: list[int] = []
        for i in idx:
            # sorted longest first: the batch's first request sets its padded length
            padded = (len(current) + 1) * (length(current[0]) if current else length(i))
            too_many = max_batch_tokens is not None and kind == "loglikelihood"
            if current and (len(current) >= batch_size or (too_many and padded > max_batch_tokens)):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    return batches


def batching(
    model_dir: str,
    batch_size: int | None,
    max_batch_tokens: int | None,
    gpus_per_actor: float,
    max_length: int | None,
) -> tuple[int, int]:
    """(batch_size, max_batch_tokens): the config's where it sets them; else fixed on CPU, and
    on GPU what fits the free memory of an actor's GPU share beside the bf16 weights."""
    if batch_size and max_batch_tokens:
        return batch_size, max_batch_tokens
    if not gpus_per_actor:
        return batch_size or CPU_BATCH_SIZE, max_batch_tokens or CPU_BATCH_TOKENS
    import torch

    from lmforge.model.artifact import load_model_config

    cfg = load_model_config(model_dir)
    free = gpu_free_bytes(gpus_per_actor)
    sequences, tokens = batch_limits(cfg, free, torch.bfloat16, max_length or cfg.max_seq_len)
    print(
        f"[eval] batches sized by memory: {sequences} sequences, {tokens} tokens "
        f"({free / 2**30:.1f} GiB free per actor)",
        flush=True,
    )
    return batch_size or sequences, max_batch_tokens or tokens


def gpu_free_bytes(gpus_per_actor: float) -> int:
    """Free memory of one actor's share of a GPU, measured by a task placed as an actor is."""
    import ray

    @ray.remote(num_gpus=gpus_per_actor)
    def free() -> int:
        import torch

        return torch.cuda.mem_get_info()[0]

    # actors sharing a GPU (gpus_per_actor < 1) split its free memory
    return int(ray.get(free.remote()) * min(1.0, gpus_per_actor))


class ScoringActor:
    """A Ray Data actor: loads the model once, then scores one batch of requests per row."""

    def __init__(self, model_dir: str, max_length: int | None, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scorer = Scorer.from_artifact(model_dir, max_length, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [
            json.dumps(self.scorer.score(json.loads(payload))) for payload in batch["payload"]
        ]
        return {"batch": batch["batch"], "result": np.array(results, dtype=object)}


def _strip(request: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k not in ("item", "slot")}


def score_local(
    scorer,
    requests: list[dict[str, Any]],
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """The same batches scored in this process (tests, and runs without Ray); unset limits are
    the CPU ones."""
    batch_size, max_batch_tokens = (
        batch_size or CPU_BATCH_SIZE,
        max_batch_tokens or CPU_BATCH_TOKENS,
    )
    results: list[dict[str, Any] | None] = [None] * len(requests)
    for idx in make_batches(requests, batch_size, max_batch_tokens):
        for i, res in zip(idx, scorer.score([requests[i] for i in idx]), strict=True):
            results[i] = res
    return results  # type: ignore[return-value]


def score_distributed(
    model_dir: str,
    requests: list[dict[str, Any]],
    batch_size: int | None,
    num_actors: int,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Results of every request, in order, scored by `num_actors` actors of a Ray Data pool
    (batch_size/max_batch_tokens None: see `batching`)."""
    import ray
    from ray.data import ActorPoolStrategy

    if not requests:
        return []
    batch_size, max_batch_tokens = batching(
        model_dir, batch_size, max_batch_tokens, gpus_per_actor, max_length
    )
    batches = make_batches(requests, batch_size, max_batch_tokens)
    rows = [
        {"batch": b, "payload": json.dumps([_strip(requests[i]) for i in idx])}
        for b, idx in enumerate(batches)
    ]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        ScoringActor,
        batch_size=1,
        compute=ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "max_length": max_length,
            "device": "cuda" if gpus_per_actor else "cpu",
            "threads": max(1, int(cpus_per_actor)),
        },
    )
    results: list[dict[str, Any] | None] = [None] * len(requests)
    for row in ds.take_all():
        for i, res in zip(batches[int(row["batch"])], json.loads(row["result"]), strict=True):
            results[i] = res
    missing = sum(r is None for r in results)
    if missing:
        raise RuntimeError(f"{missing} of {len(requests)} eval requests came back without a result")
    return results  # type: ignore[return-value]
