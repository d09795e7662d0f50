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
the logits of the real positions, so batches are right-padded (with id 0). The model has no
KV cache yet either, so generation re-runs the (truncated) sequence for every new token: slow
but simple and correct, and fine for the short answers of eval tasks. Generation stops at the
model's own stop ids (lmforge.model.special).
"""

from __future__ import annotations

import torch

from lmforge.model.special import LMFORGE, SpecialTokens

PAD_ID = 0  # any id works: padding comes after the real tokens, which never attend to it


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

        model = load_model(directory, device=device)
        tokenizer = Tokenizer.from_str(storage.read_text(storage.join(directory, TOKENIZER)))
        special = load_special_tokens(directory, tokenizer)
        return cls(model, tokenizer, max_length, device, special)

    def score(self, requests: list[dict]) -> list[dict]:
        """Results of a batch of requests, in order (log-likelihoods in one forward pass)."""
        out: list[dict | None] = [None] * len(requests)
        ll = [i for i, r in enumerate(requests) if r["kind"] == "loglikelihood"]
        for i, result in zip(ll, self.loglikelihood([requests[i] for i in ll]), strict=True):
            out[i] = result
        for i, r in enumerate(requests):
            if r["kind"] == "generate":
                out[i] = {"text": self.generate(r)}
            elif r["kind"] != "loglikelihood":
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

    @torch.no_grad()
    def generate(self, request: dict) -> str:
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
        return cut_at_stop(text, stops)


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
