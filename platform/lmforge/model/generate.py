"""Incremental decoding: a slot-based KV cache, sampling, stop strings and logprobs.

The cache holds `slots` sequences of up to `max_seq_len` tokens. A forward pass names the slots
of its rows (`rows`), and each row carries its own positions, so rows at different lengths
decode together: this is what continuous batching (lmforge.serve.engine) builds on. `generate`
below is the simple static-batch loop on the same pieces, for evaluation and scripts.

    cache = KVCache(model.cfg, slots=8)
    logits = forward(model, cache, rows=[3], tokens=[prompt], start=[0])   # prefill slot 3
    logits = forward(model, cache, rows=[3, 5], tokens=[[t3], [t5]], start=[n3, n5])  # decode
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmforge.model.llama import Llama, LlamaConfig
from lmforge.model.special import LMFORGE, SpecialTokens


class LayerCache:
    """One layer's view of the cache for the rows of the current forward pass."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, span: int) -> None:
        self.k, self.v, self.rows = k, v, rows  # (slots, K, S_max, E) each; rows (B,)
        self.span = span  # positions 0..span-1 are in use (known on the host: no GPU sync)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store k, v (B, K, T, E) at `positions` (B, T); return all cached k, v and the mask."""
        rows = self.rows[:, None]  # (B, 1) broadcast against positions (B, T)
        self.k[rows, :, positions] = k.transpose(1, 2)  # indexed view is (B, T, K, E)
        self.v[rows, :, positions] = v.transpose(1, 2)
        S = self.span
        keys, values = self.k[self.rows, :, :S], self.v[self.rows, :, :S]  # (B, K, S, E)
        # A query at position p sees the keys at 0..p of its own row (causal, per row).
        mask = torch.arange(S, device=k.device) <= positions[:, None, :, None]  # (B, 1, T, S)
        return keys, values, mask


class KVCache:
    """Keys and values of every layer for `slots` sequences: (layers, slots, K, S_max, E) each."""

    def __init__(
        self,
        cfg: LlamaConfig,
        slots: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_seq_len: int | None = None,
    ) -> None:
        self.slots, self.max_seq_len = slots, max_seq_len or cfg.max_seq_len
        shape = (cfg.n_layers, slots, cfg.n_kv_heads, self.max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = torch.zeros(0, dtype=torch.long, device=device)
        self.span = 0

    def __getitem__(self, layer: int) -> LayerCache:
        return LayerCache(self.k[layer], self.v[layer], self.rows, self.span)


@torch.no_grad()
def forward(
    model: Llama,
    cache: KVCache,
    rows: Sequence[int],
    tokens: Sequence[Sequence[int]],
    start: Sequence[int],
) -> torch.Tensor:
    """Run `tokens` (B rows of equal length T) at positions start..start+T-1 of their cache slots.

    Returns logits (B, T, V) in fp32.
    """
    device = cache.k.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)  # (B, T)
    offsets = torch.arange(ids.shape[1], device=device)
    positions = torch.tensor(start, dtype=torch.long, device=device)[:, None] + offsets  # (B, T)
    cache.rows = torch.tensor(rows, dtype=torch.long, device=device)
    cache.span = max(start) + ids.shape[1]
    return model(ids, positions=positions, kv_cache=cache).float()


# ---------------------------------------------------------------- sampling


@dataclass
class SamplingParams:
    """How one sequence is decoded (the OpenAI request fields, already validated)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's (SpecialTokens.stop_ids)
    logprobs: int | None = None  # None = no logprobs; k >= 0 = the chosen token's + top k
    echo: bool = False  # also return the prompt tokens (with logprobs when asked)
    tenant: str = ""  # who asked (an API key id): the engine shares its batch fairly among them


def stop_ids(params: SamplingParams, special: SpecialTokens) -> tuple[int, ...]:
    """The token ids that end a sequence: the request's own, else the model's."""
    return special.stop_ids if params.stop_token_ids is None else params.stop_token_ids


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A per-request random stream: the same seed gives the same tokens whatever the batch."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Next token from one row's logits (V,) fp32."""
    return sample_batch(logits[None], [params], [gen])[0]


def sample_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], gens: Sequence[torch.Generator]
) -> list[int]:
    """Next token of each row of logits (B, V) fp32, with one host sync for the whole batch.

    Sampling is the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a draw from
    softmax(logits / T). Each row's noise comes from its own generator and everything else is
    row-wise, so a seeded request gets the same tokens whatever else is in the batch.
    """
    B, V = logits.shape
    device = logits.device
    temps = torch.tensor([max(p.temperature, 1e-6) for p in params], device=device)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    scaled, order = (logits / temps[:, None]).sort(dim=-1, descending=True)  # (B, V) each
    rank = torch.arange(V, device=device)
    probs = torch.softmax(scaled, dim=-1)
    # Keep the top k, and the smallest prefix whose mass reaches top_p (always the first).
    drop = (rank >= top_k[:, None]) | (probs.cumsum(-1) - probs >= top_p[:, None])
    noise = torch.stack([torch.rand(V, generator=g, device=device) for g in gens])
    gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))  # per vocabulary id
    pick = (scaled.masked_fill(drop, -math.inf) + gumbel.gather(1, order)).argmax(-1)
    sampled = order.gather(1, pick[:, None])[:, 0]
    greedy = torch.tensor([p.temperature <= 0 for p in params], device=device)
    return torch.where(greedy, logits.argmax(-1), sampled).tolist()


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities (of the raw model distribution) of `chosen` (T,) given logits (T, V),
    and the `top` most likely (token, logprob) pairs at each position."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, chosen[:, None])[:, 0].tolist()
    if top <= 0:
        return picked, [[] for _ in picked]
    values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    tops = [
        list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    return picked, tops


# ---------------------------------------------------------------- text and stop strings


class TextTracker:
    """The decoded text of a growing token list: deltas safe to stream, and stop strings.

    Text is withheld while it ends in an incomplete UTF-8 character or could be the start of a
    stop string, so a streamed answer never shows what the final answer cuts off.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; return the new text that is safe to emit (maybe empty)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self.flush()
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:  # hold back a suffix that a stop string starts with
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._emit(safe)

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the sequence)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out


# ---------------------------------------------------------------- static batch generation


@torch.no_grad()
def generate(
    model: Llama,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    special: SpecialTokens = LMFORGE,
) -> list[dict]:
    """Decode each prompt with the KV cache; the prompts share one batch of decode steps.
    Generation stops at `special.stop_ids` (an artifact's: model.special.load_special_tokens)
    unless a request names its own `stop_token_ids`.

    Returns per prompt {"tokens": [...], "text": str, "finish_reason": "stop" | "length",
    "logprobs": [float] (when asked)}. Prefill runs one prompt at a time (no padding needed).
    """
    plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    cache = KVCache(model.cfg, len(prompts), device=device, dtype=dtype)
    states = []
    for row, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
        budget = min(p.max_tokens, model.cfg.max_seq_len - len(prompt))
        state = {"row": row, "pos": len(prompt), "tokens": [], "logprobs": [], "budget": budget}
        state.update(text=TextTracker(tokenizer, p.stop), gen=make_generator(p.seed, device))
        state["finish"] = "length" if budget <= 0 else None
        if budget > 0:
            state["last"] = forward(model, cache, [row], [list(prompt)], [0])[0, -1]
        states.append(state)
    while True:
        live = [s for s in states if s["finish"] is None]
        if not live:
            break
        logits = torch.stack([s["last"] for s in live])
        tokens = sample_batch(logits, [plist[s["row"]] for s in live], [s["gen"] for s in live])
        for s, token in zip(live, tokens, strict=True):
            p = plist[s["row"]]
            if p.logprobs is not None:
                s["logprobs"].append(
                    token_logprobs(s["last"][None], torch.tensor([token], device=device), 0)[0][0]
                )
            s["tokens"].append(token)
            if token in stop_ids(p, special):
                s["finish"] = "stop"
                continue
            s["text"].add(token)
            if s["text"].stopped:
                s["finish"] = "stop"
            elif len(s["tokens"]) >= s["budget"]:
                s["finish"] = "length"
        live = [s for s in live if s["finish"] is None]
        if not live:
            break
        logits = forward(
            model,
            cache,
            [s["row"] for s in live],
            [[s["tokens"][-1]] for s in live],
            [s["pos"] + len(s["tokens"]) - 1 for s in live],
        )
        for s, row_logits in zip(live, logits[:, -1], strict=True):
            s["last"] = row_logits
    out = []
    for s, p in zip(states, plist, strict=True):
        result = {"tokens": s["tokens"], "text": s["text"].text, "finish_reason": s["finish"]}
        if p.logprobs is not None:
            result["logprobs"] = s["logprobs"]
        out.append(result)
    return out
