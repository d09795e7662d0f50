"""Scoring with a model on one device: log-likelihoods of continuations, and text generation.

Requests arrive already tokenized (the driver tokenizes, so it can group requests of similar
length into batches before distributing them). Two kinds:

    {"kind": "loglikelihood", "context": [ids], "continuation": [ids]}
        -> {"loglikelihood": sum of log p(continuation | context) in nats,
            "greedy": whether greedy decoding would have produced the continuation,
            "tokens": len(continuation)}
    {"kind": "generate", "prompt": [ids], "stop": [str], "max_new_tokens": int,
     "temperature": float, "top_k": int | None, "seed": int}
        -> {"text": the generated text, cut before the first stop sequence}

The model has no attention mask, but attention is causal: right-padding a batch never changes
the logits of the real positions, so batches are right-padded (with id 0). Generation requests
of a batch decode together with the KV cache (lmforge.model.generate.generate: one prefill per
prompt, then one batched step per token); a prompt keeps its last max_length - max_new_tokens
tokens so the answer fits the context. Models that cannot take the cache (a mixed-precision
model in training, whose cache would be allocated in the parameters' fp32 while its k/v are
bf16; a test double) re-run the sequence for every new token instead. Generation stops at the
model's own stop ids (lmforge.model.special).

On a GPU the model runs in bf16 (log-likelihoods are still summed in fp32), on CPU in fp32.
"""

from __future__ import annotations

import torch

from lmforge.model.special import LMFORGE, SpecialTokens

PAD_ID = 0  # any id works: padding comes after the real tokens, which never attend to it


def eval_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a model is evaluated in: bf16 on a GPU (half the memory and bandwidth, tensor
    cores), fp32 on CPU (where bf16 matmuls are slow without AMX and the tests compare exactly)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# Batches on CPU, where memory is not what limits them (EvalConfig's None means these there).
CPU_BATCH_SIZE, CPU_BATCH_TOKENS = 16, 16384
MAX_BATCH_SIZE = 256  # beyond this a batch saves no launches worth having, only padding
GIB = 2**30


def batch_limits(cfg, free_bytes: int, dtype: torch.dtype, max_length: int) -> tuple[int, int]:
    """(sequences, padded tokens) per batch for a model of LlamaConfig `cfg` in `dtype` on a
    device with `free_bytes` free, before the model is loaded on it.

    What a batch holds beside the weights: per padded token of a log-likelihood batch, its
    logits (V in `dtype`) and one layer's transient activations (residual, norm, q/k/v and
    attention out ~6 D, the SwiGLU's 3 F); per row scored, its continuation's fp32
    log-softmax and copy (at most max_length x V x 8 bytes); per generated sequence, the KV
    cache generate() allocates (2 x layers x kv heads x head dim x max_seq_len) and one
    prompt's fp32 prefill logits. 10% and 1 GiB are left for the allocator and the CUDA
    context.
    """
    from lmforge import LmforgeError
    from lmforge.model.llama import num_params

    p = torch.finfo(dtype).bits // 8
    V, D, F = cfg.vocab_size, cfg.dim, cfg.ffn_dim
    weights = num_params(cfg) * p
    budget = 0.9 * (free_bytes - weights) - GIB - 8 * max_length * V
    per_token = p * (V + 6 * D + 3 * F)
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.max_seq_len * p
    tokens, sequences = int(budget // per_token), int(budget // kv)
    if tokens < max_length or sequences < 1:
        raise LmforgeError(
            f"the model ({weights / GIB:.1f} GiB of weights) leaves too little of the "
            f"{free_bytes / GIB:.1f} GiB free for one sequence of {max_length} tokens: give "
            "resources.gpus_per_actor=1 (a GPU of its own), a smaller max_length, or set "
            "batch_size and max_batch_tokens"
        )
    return min(sequences, MAX_BATCH_SIZE), tokens


class Scorer:
    """A model, its tokenizer and a context length: what one eval worker holds."""

    def __init__(
        self,
        model,
        tokenizer,
        max_length: int | None = None,
        device: str = "cpu",
        special: SpecialTokens = LMFORGE,
    ):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.special = special
        self.max_length = min(max_length or model.cfg.max_seq_len, model.cfg.max_seq_len)

    @classmethod
    def from_artifact(cls, directory: str, max_length: int | None = None, device: str = "cpu"):
        from tokenizers import Tokenizer

        from lmforge import storage
        from lmforge.model.artifact import TOKENIZER, load_model
        from lmforge.model.special import load_special_tokens

        model = load_model(directory, device=device).to(eval_dtype(device))
        tokenizer = Tokenizer.from_str(storage.read_text(storage.join(directory, TOKENIZER)))
        special = load_special_tokens(directory, tokenizer)
        return cls(model, tokenizer, max_length, device, special)

    def score(self, requests: list[dict]) -> list[dict]:
        """Results of a batch of requests, in order (log-likelihoods in one forward pass)."""
        out: list[dict | None] = [None] * len(requests)
        ll = [i for i, r in enumerate(requests) if r["kind"] == "loglikelihood"]
        for i, result in zip(ll, self.loglikelihood([requests[i] for i in ll]), strict=True):
            out[i] = result
        gen = [i for i, r in enumerate(requests) if r["kind"] == "generate"]
        for i, (_, text) in zip(gen, self.generate_batch([requests[i] for i in gen]), strict=True):
            out[i] = {"text": text}
        for r in requests:
            if r["kind"] not in ("loglikelihood", "generate"):
                raise ValueError(f"unknown request kind {r['kind']!r}")
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood(self, requests: list[dict]) -> list[dict]:
        if not requests:
            return []
        inputs, conts = [], []
        for r in requests:
            cont = list(r["continuation"])
            if not cont or len(cont) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens cannot be scored with a context of "
                    f"{self.max_length} tokens"
                )
            # The last max_length + 1 tokens of context + continuation; the input drops the last.
            full = (list(r["context"]) + cont)[-(self.max_length + 1) :]
            inputs.append(full[:-1])
            conts.append(cont)
        T = max(len(x) for x in inputs)
        batch = torch.full((len(inputs), T), PAD_ID, dtype=torch.long)
        for i, x in enumerate(inputs):
            batch[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        logits = self.model(batch.to(self.device))  # (B, T, V), the model's dtype
        results = []
        for i, (x, cont) in enumerate(zip(inputs, conts, strict=True)):
            n = len(cont)
            # fp32 only for the positions that score the continuation
            logp = torch.log_softmax(logits[i, len(x) - n : len(x)].float(), dim=-1)  # (n, V)
            target = torch.tensor(cont, dtype=torch.long, device=logp.device)
            ll = logp.gather(1, target[:, None]).sum().item()
            greedy = bool((logp.argmax(-1) == target).all().item())
            results.append({"loglikelihood": ll, "greedy": greedy, "tokens": n})
        return results

    def generate_batch(self, requests: list[dict]) -> list[tuple[list[int], str]]:
        """(answer tokens, answer text) of generation requests, decoded together with the KV
        cache (the tokens end before a stop id; the text before a stop sequence)."""
        if not requests:
            return []
        if not self.cached():
            return [self.generate_uncached(r) for r in requests]
        from lmforge.model.generate import SamplingParams, generate

        prompts, params = [], []
        for r in requests:
            new = int(r["max_new_tokens"])
            keep = max(1, self.max_length - new)  # the prompt's tail, leaving room for the answer
            prompts.append((list(r["prompt"]) or [self.special.prefix_id or 0])[-keep:])
            params.append(
                SamplingParams(
                    max_tokens=new,
                    temperature=float(r.get("temperature") or 0.0),
                    top_k=int(r.get("top_k") or 0),
                    seed=int(r.get("seed", 0)),
                    stop=[s for s in r.get("stop") or [] if s],
                )
            )
        results = generate(self.model, self.tokenizer, prompts, params, self.special)
        out = []
        for res, p in zip(results, params, strict=True):
            tokens = res["tokens"]
            if tokens and res["finish_reason"] == "stop" and tokens[-1] in self.special.stop_ids:
                tokens = tokens[:-1]
            out.append((tokens, cut_at_stop(res["text"], p.stop)))
        return out

    def cached(self) -> bool:
        """Whether generation can use the KV cache: a plain Llama whose cache, allocated in the
        parameters' dtype, is the dtype it computes in (not under autocast, not FSDP-sharded)."""
        from lmforge.model.llama import Llama

        if not isinstance(self.model, Llama) or torch.is_autocast_enabled(self.device.type):
            return False
        return not any(type(p).__name__ == "DTensor" for p in self.model.parameters())

    def generate(self, request: dict) -> str:
        """One answer's text (the KV-cached path where the model takes it)."""
        return self.generate_batch([request])[0][1]

    @torch.no_grad()
    def generate_uncached(self, request: dict) -> tuple[list[int], str]:
        """One answer without the cache: the whole (truncated) sequence again for every token."""
        ids = list(request["prompt"]) or [self.special.prefix_id or 0]
        stops = [s for s in request.get("stop") or [] if s]
        temperature = float(request.get("temperature") or 0.0)
        top_k = request.get("top_k")
        gen = torch.Generator().manual_seed(int(request.get("seed", 0)))
        new: list[int] = []
        text = ""
        for _ in range(int(request["max_new_tokens"])):
            window = (ids + new)[-self.max_length :]
            x = torch.tensor([window], dtype=torch.long, device=self.device)
            logits = self.model(x)[0, -1].float().cpu()  # (V,)
            if temperature <= 0:
                token = int(logits.argmax().item())
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(int(top_k), logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).item())
            if token in self.special.stop_ids:
                break
            new.append(token)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if any(s in text for s in stops):
                break
        return new, cut_at_stop(text, stops)


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The text before the earliest occurrence of any stop sequence."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def rolling_windows(
    tokens: list[int], max_length: int, prefix: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of a long document exactly once.

    lm-evaluation-harness's `get_rolling_token_windows(..., context_len=1)` made disjoint: the
    first window predicts the first max_length tokens after the prefix token (the model's
    SpecialTokens.prefix_id: lmforge's <|eos|>, which precedes every document in the packed
    training stream, or an imported model's BOS); each later window predicts the
    next max_length tokens from the tokens right before them, max_length input tokens in all.
    A document that fits gets one window: exactly the full-context loss.
    """
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        # the input is tokens[end - max_length - 1 : end - 1]; its last n positions predict
        windows.append((tokens[max(0, end - max_length - 1) : done], tokens[done:end]))
        done = end
    return windows
