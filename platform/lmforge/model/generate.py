"""Incremental decoding: forward passes over the KV cache, sampling, stop strings, logprobs.

The cache (lmforge.model.kvcache) holds `slots` sequences of up to `max_seq_len` tokens. A
forward pass names the slots of its rows (`rows`), and each row carries its own positions, so
rows at different lengths run together: this is what continuous batching
(lmforge.serve.engine) builds on. `generate` below is the simple static-batch loop on the same
pieces, for evaluation and scripts.

    cache = KVCache(model.cfg, slots=8)
    logits = forward(model, cache, rows=[3, 1], tokens=[p3, p1], start=[0, 0],
                     keep=last_positions([p3, p1]))              # prefill slots 3 and 1: (2, V)
    logits = forward(model, cache, rows=[3, 1], tokens=[[t3], [t1]], start=[n3, n1])  # decode
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmforge.model.kvcache import KVCache, head, hidden_forward, host_to_device
from lmforge.model.llama import Llama
from lmforge.model.special import LMFORGE, SpecialTokens


@torch.no_grad()
def forward(
    model: Llama,
    cache: KVCache,
    rows: Sequence[int],
    tokens: Sequence[Sequence[int]],
    start: Sequence[int],
    keep: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Run each row's `tokens` at positions start..start+len-1 of its cache slot `rows[i]`.

    Rows may differ in length (a batch of prefill chunks): shorter ones are padded, and their
    padding writes only to the cache's scratch column. `keep` names, per row, the offsets into
    its tokens whose logits are wanted; the result is then (N, V) fp32, the kept positions in
    row order, and the output head runs on those alone (a prefill wants the last position, not
    a (T, V) block per prompt). Without `keep`: (B, T, V) fp32, every position.
    """
    device = cache.device
    T = max(len(t) for t in tokens)
    if max(s + len(t) for s, t in zip(start, tokens, strict=True)) > cache.max_seq_len:
        raise ValueError(f"a row runs past the cache's max_seq_len {cache.max_seq_len}")
    ids, pos, write = [], [], []
    for s, t in zip(start, tokens, strict=True):
        n, last = len(t), cache.max_seq_len - 1
        ids.append(list(t) + [0] * (T - n))
        pos.append([min(s + j, last) for j in range(T)])
        write.append([s + j if j < n else cache.scratch for j in range(T)])
    host = host_to_device([ids, pos, write], torch.long, device)  # (3, B, T): one copy
    span = cache.window([s + len(t) for s, t in zip(start, tokens, strict=True)])
    cache.prefix = list(rows) == list(range(len(rows)))
    cache.prepare(host_to_device(list(rows), torch.long, device), host[1], host[2], span)
    hidden = hidden_forward(model, host[0], host[1], cache)  # (B, T, D)
    if keep is None:
        return head(model, hidden)
    index = [(i, j) for i, offsets in enumerate(keep) for j in offsets]
    picked = host_to_device(index, torch.long, device).reshape(-1, 2)
    return head(model, hidden[picked[:, 0], picked[:, 1]])


def last_positions(tokens: Sequence[Sequence[int]]) -> list[list[int]]:
    """`keep` for the last token of each row."""
    return [[len(t) - 1] for t in tokens]


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
    """Next token of each row of logits (B, V) fp32, with one host sync for the whole batch."""
    return sample_tokens(logits, params, gens).tolist()


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], gens: Sequence[torch.Generator]
) -> torch.Tensor:
    """Next token of each row of logits (B, V) fp32, as a (B,) tensor on their device: nothing
    here waits for the device (the per-row settings go over in one pinned copy).

    Sampling is the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a draw from
    softmax(logits / T). Each row's noise comes from its own generator and everything else is
    row-wise, so a seeded request gets the same tokens whatever else is in the batch.
    """
    B, V = logits.shape
    device = logits.device
    greedy_rows = [p.temperature <= 0 for p in params]
    if all(greedy_rows):
        return logits.argmax(-1)
    settings = host_to_device(
        [
            [max(p.temperature, 1e-6) for p in params],
            [p.top_k if 0 < p.top_k < V else V for p in params],
            [p.top_p for p in params],
            [float(g) for g in greedy_rows],
        ],
        torch.float32,
        device,
    )
    temps, top_k, top_p, greedy = settings[0], settings[1], settings[2], settings[3] > 0
    scaled, order = (logits / temps[:, None]).sort(dim=-1, descending=True)  # (B, V) each
    rank = torch.arange(V, device=device)
    probs = torch.softmax(scaled, dim=-1)
    # Keep the top k, and the smallest prefix whose mass reaches top_p (always the first).
    drop = (rank >= top_k[:, None]) | (probs.cumsum(-1) - probs >= top_p[:, None])
    noise = torch.stack([torch.rand(V, generator=g, device=device) for g in gens])
    gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))  # per vocabulary id
    pick = (scaled.masked_fill(drop, -math.inf) + gumbel.gather(1, order)).argmax(-1)
    sampled = order.gather(1, pick[:, None])[:, 0]
    return torch.where(greedy, logits.argmax(-1), sampled)


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

    Decoding is incremental (the tokenizer's `DecodeStream`: each token decodes a short window,
    not the whole sequence again, so a long answer costs O(n), not O(n^2)); a token that ends
    inside a multi-byte UTF-8 character gives no text until the character completes. Text is
    also withheld while it could be the start of a stop string, so a streamed answer never
    shows what the final answer cuts off.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; return the new text that is safe to emit (maybe empty)."""
        self.ids.append(token)
        before = len(self.text)
        self.text += self.stream.step(self.tokenizer, token) or ""
        for s in self.stop:
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self.flush()
        safe = len(self.text)
        for s in self.stop:  # hold back a suffix that a stop string starts with
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._emit(safe)

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the sequence), with the bytes of an
        incomplete last character decoded as the full decode would (U+FFFD)."""
        if not self.stopped and self.ids:
            full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if full.startswith(self.text):
                self.text = full
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
    "logprobs": [float] (when asked)}. The prompts are prefilled together in one pass.
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
        states.append(state)
    live = [s for s in states if s["finish"] is None]
    if live:  # every prompt prefilled in one pass, logits of the last positions only
        chunks = [list(prompts[s["row"]]) for s in live]
        rows, start = [s["row"] for s in live], [0] * len(live)
        logits = forward(model, cache, rows, chunks, start, keep=last_positions(chunks))
    while live:
        chosen = sample_tokens(logits, [plist[s["row"]] for s in live], [s["gen"] for s in live])
        tokens = chosen.tolist()
        for i, (s, token) in enumerate(zip(live, tokens, strict=True)):
            p = plist[s["row"]]
            if p.logprobs is not None:
                s["logprobs"].append(token_logprobs(logits[i : i + 1], chosen[i : i + 1], 0)[0][0])
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
            keep=[[0]] * len(live),
        )
    out = []
    for s, p in zip(states, plist, strict=True):
        s["text"].flush()
        result = {"tokens": s["tokens"], "text": s["text"].text, "finish_reason": s["finish"]}
        if p.logprobs is not None:
            result["logprobs"] = s["logprobs"]
        out.append(result)
    return out
