"""Engine outputs as OpenAI response objects: completion choices, chat messages and chunks."""

from __future__ import annotations

from lmforge.serve.engine import Output, TokenLogprob


class CompletionLogprobs:
    """The completions `logprobs` object, built across stream chunks (text offsets continue)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.offset = tokenizer, 0

    def render(self, outs: list[Output]) -> dict:
        lp: dict[str, list] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for out in outs:
            for entry in (out.prompt_logprobs or []) + (out.logprobs or []):
                text = token_text(self.tokenizer, entry.token)
                lp["tokens"].append(text)
                lp["token_logprobs"].append(entry.logprob)
                lp["top_logprobs"].append(self._top(entry, text))
                lp["text_offset"].append(self.offset)
                self.offset += len(text)
        return lp

    def _top(self, entry: TokenLogprob, text: str) -> dict[str, float] | None:
        if entry.logprob is None:
            return None
        # As vLLM: the top k, plus the chosen token (so logprobs=1 shows whether it was greedy).
        top = {token_text(self.tokenizer, t): lp for t, lp in entry.top}
        top.setdefault(text, entry.logprob)
        return top


def logprob_state(tokenizer) -> CompletionLogprobs:
    return CompletionLogprobs(tokenizer)


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def completion_choice(
    index: int, text: str, outs: list[Output], lp: CompletionLogprobs | None, finish: str | None
) -> dict:
    return {
        "index": index,
        "text": text,
        "logprobs": lp.render(outs) if lp is not None else None,
        "finish_reason": _finish(finish),
    }


def completion_response(
    rid: str, created: int, model: str, fingerprint: str | None, choices: list[dict], usage=None
) -> dict:
    """A completions response, or one stream chunk of it (`usage`: the whole request's)."""
    response = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if usage is not None:
        response["usage"] = usage
    return response


def chat_logprobs(outs: list[Output], tokenizer) -> dict:
    content = []
    for out in outs:
        for entry in out.logprobs or []:
            text = token_text(tokenizer, entry.token)
            top = []
            for t, lp in entry.top:
                s = token_text(tokenizer, t)
                top.append({"token": s, "logprob": lp, "bytes": list(s.encode())})
            content.append(
                {
                    "token": text,
                    "logprob": entry.logprob,
                    "bytes": list(text.encode()),
                    "top_logprobs": top,
                }
            )
    return {"content": content}


def chat_response(rid, created, model, results: list[list[Output]], tokenizer, with_lp) -> dict:
    choices, completion = [], 0
    for k, outs in enumerate(results):
        choices.append(
            {
                "index": k,
                "message": {"role": "assistant", "content": "".join(o.text for o in outs)},
                "logprobs": chat_logprobs(outs, tokenizer) if with_lp else None,
                "finish_reason": _finish(outs[-1].finish_reason),
            }
        )
        completion += outs[-1].completion_tokens
    prompt = results[0][-1].prompt_tokens
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def chat_chunk(rid, created, model, index, delta, out=None, tokenizer=None, with_lp=False) -> dict:
    choice = {
        "index": index,
        "delta": delta,
        "logprobs": chat_logprobs([out], tokenizer) if with_lp and out is not None else None,
        "finish_reason": _finish(out.finish_reason) if out is not None else None,
    }
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def _finish(reason: str | None) -> str | None:
    # "cancelled" never reaches a client (it has gone); anything else unknown reads as "stop".
    return reason if reason in (None, "stop", "length") else "stop"
