"""Tolerances that follow from the dtype and the accumulation, so a test passes on any CPU.

Two code paths that compute the same function (a KV cache against a full forward pass, merged
LoRA weights against adapters, a packed row against its documents alone, two CPU kernels:
AVX2, AVX-512, AMX) differ only in rounding. A sum of n terms in another order differs by at
most about n * eps * sum|terms| (Higham, Accuracy and Stability of Numerical Algorithms, 3.1),
so the tolerance is eps(dtype) x the longest reduction x the values' magnitude, once per layer
the error passes through. A fixed `atol=1e-4` is not: it is 800 eps at magnitude 1 and a few
eps at magnitude 100, and which kernel runs depends on the CPU.

Where a test is about equal math, not about fp32, it computes both sides in float64 (the
model's norms and RoPE promote to at least fp32, so a float64 model is float64 throughout):
the bound is then ~1e-12, kernel choice cannot reach it, and a real bug (a wrong mask, an
off-by-one position) is off by 1e-3 or more.
"""

from __future__ import annotations

import torch


def tolerance(
    dtype: torch.dtype,
    *,
    terms: int,
    magnitude: float,
    depth: int = 1,
    stored_as: torch.dtype | None = None,
) -> float:
    """Worst-case absolute difference of two summation orders: depth x terms x eps x magnitude.

    `stored_as`: both sides were rounded once more to this dtype at the end (e.g. logits cast
    to fp32): they may then also sit one unit in the last place apart at the magnitude.
    `magnitude` is at least 1: inside a model the activations are normalised to ~1 whatever
    the outputs' size.
    """
    magnitude = max(abs(magnitude), 1.0)
    tol = depth * terms * torch.finfo(dtype).eps * magnitude
    if stored_as is not None:
        tol += torch.finfo(stored_as).eps * magnitude
    return tol


def model_terms(cfg, seq_len: int) -> dict[str, int]:
    """The longest reduction (the widest matmul, attention over `seq_len` keys, or the loss's
    log-sum-exp over the vocabulary, which loss parallelism sums in another order) and the
    depth (one per block, one for the head) of a Llama forward pass, as `tolerance` takes them."""
    terms = max(cfg.dim, cfg.ffn_dim, seq_len, getattr(cfg, "vocab_size", 0))
    return {"terms": terms, "depth": cfg.n_layers + 1}


def assert_same_math(
    got: torch.Tensor,
    want: torch.Tensor,
    dtype: torch.dtype,
    *,
    terms: int,
    depth: int = 1,
    stored_as: torch.dtype | None = None,
) -> None:
    """got == want up to the rounding of computing in `dtype` (see `tolerance`)."""
    got64, want64 = got.double(), want.double()
    tol = tolerance(
        dtype, terms=terms, magnitude=want64.abs().max().item(), depth=depth, stored_as=stored_as
    )
    torch.testing.assert_close(got64, want64, rtol=0, atol=tol)


def loglikelihood_tolerance(cfg, logits: torch.Tensor) -> float:
    """Two fp32 computations of a sum of up to T token log-likelihoods from `logits` (B, T, V):
    each token's through the network, then a log-softmax over the vocabulary."""
    T, V, size = logits.shape[1], logits.shape[-1], logits.abs().max().item()
    one = tolerance(torch.float32, **model_terms(cfg, T), magnitude=size)
    return T * (one + tolerance(torch.float32, terms=V, magnitude=size))


def loss_curve_tolerance(cfg, seq_len: int, loss: float, step: int) -> float:
    """Two fp32 training runs of the same batches that differ only in summation order (FSDP's
    reduce-scatter, another worker or accumulation split): the rounding of a pass through the
    model, compounded once per optimizer step so far, at the loss's magnitude."""
    bound = model_terms(cfg, seq_len)
    depth = bound["depth"] * max(step, 1)
    return tolerance(torch.float32, terms=bound["terms"], magnitude=loss, depth=depth)
