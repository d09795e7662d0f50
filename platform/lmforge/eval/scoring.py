"""From task items to model requests, and from the model's answers back to metrics.

`build_requests` turns each item into tokenized requests (see `lm.py`), tagged with the item and
a slot (the choice index, the sentence of a pair, the window of a long document).
`task_metrics` folds the results back, per item and then per task. Tokenization follows
lm-evaluation-harness: trailing spaces of a context move to the continuation, the continuation's
tokens are those of tokenize(context + continuation) after tokenize(context), and every context
starts with the model's prefix token (lmforge.model.special: <|eos|>, which precedes each
document in lmforge's packed training stream, or an imported model's BOS).
"""

from __future__ import annotations

from typing import Any

from lmforge.eval import metrics as M
from lmforge.eval.lm import rolling_windows
from lmforge.eval.tasks import Items, TaskSpec, class_labels, references, render_prompt
from lmforge.model.special import LMFORGE, SpecialTokens


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_pair(
    tokenizer, context: str, continuation: str, prefix: int
) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    # as lm-eval; only if the continuation merged into the context entirely, encode it alone
    cont = whole[len(ctx) :] or encode(tokenizer, continuation)
    return [prefix, *ctx], cont


def document_requests(tokens: list[int], max_length: int, item: int, slot: int, prefix: int):
    return [
        {"kind": "loglikelihood", "context": c, "continuation": t, "item": item, "slot": slot}
        for c, t in rolling_windows(tokens, max_length, prefix)
    ]


def build_requests(
    spec: TaskSpec,
    items: Items,
    tokenizer,
    max_length: int,
    generation: dict[str, Any],
    special: SpecialTokens = LMFORGE,
) -> list[dict[str, Any]]:
    """Every request of a task, in item order; contexts start with `special.prefix_id`."""
    out: list[dict[str, Any]] = []
    start = special.prefix_id if special.prefix_id is not None else 0
    labels = class_labels(spec, items) if spec.type == "classification" else []
    for i, row in enumerate(items.rows):
        if spec.type in ("multiple_choice", "classification"):
            prompt = render_prompt(spec, items, i)
            choices = row["choices"] if spec.type == "multiple_choice" else labels
            for slot, choice in enumerate(choices):
                ctx, cont = encode_pair(tokenizer, prompt, spec.target_delimiter + choice, start)
                out.append(
                    {
                        "kind": "loglikelihood",
                        "context": ctx,
                        "continuation": cont,
                        "item": i,
                        "slot": slot,
                    }
                )
        elif spec.type == "generation":
            out.append(
                {
                    "kind": "generate",
                    "prompt": [start, *encode(tokenizer, render_prompt(spec, items, i))],
                    "stop": spec.stop,
                    "max_new_tokens": spec.max_new_tokens or generation["max_new_tokens"],
                    "temperature": generation["temperature"],
                    "top_k": generation["top_k"],
                    "seed": generation["seed"] * 1_000_003 + i,
                    "item": i,
                    "slot": 0,
                }
            )
        elif spec.type == "perplexity" and "tokens" in row:  # a packed block of the val split
            toks = list(row["tokens"])
            out += document_requests(toks[1:], max_length, i, 0, prefix=toks[0])
        elif spec.type == "perplexity":
            out += document_requests(encode(tokenizer, row["text"]), max_length, i, 0, start)
        elif spec.type == "bias_pairs":
            for slot, key in enumerate(("sent_more", "sent_less")):
                tokens = encode(tokenizer, row[key])
                out += document_requests(tokens, max_length, i, slot, start)
    return out


def _per_slot(requests: list[dict], results: list[dict], n_items: int) -> list[dict[int, dict]]:
    """Per item, per slot: summed log-likelihood and tokens over windows, or the generated text."""
    slots: list[dict[int, dict]] = [{} for _ in range(n_items)]
    for req, res in zip(requests, results, strict=True):
        acc = slots[req["item"]].setdefault(req["slot"], {"loglikelihood": 0.0, "tokens": 0})
        if "text" in res:
            acc["text"] = res["text"]
        else:
            acc["loglikelihood"] += res["loglikelihood"]
            acc["tokens"] += res["tokens"]
    return slots


def task_metrics(
    spec: TaskSpec,
    items: Items,
    requests: list[dict],
    results: list[dict],
    bytes_per_token: float | None = None,
) -> tuple[dict[str, M.Metric], list[dict[str, Any]]]:
    """(metric -> Metric, one sample record per item) of a task."""
    slots = _per_slot(requests, results, len(items.rows))
    rows, lines = items.rows, items.lines
    if spec.type in ("multiple_choice", "classification"):
        lls = [[s[k]["loglikelihood"] for k in sorted(s)] for s in slots]
        if spec.type == "multiple_choice":
            choices = [r["choices"] for r in rows]
            answers: list = [r["answer"] for r in rows]
        else:
            labels = class_labels(spec, items)
            choices = [labels] * len(rows)
            answers = [str(r["label"]) for r in rows]
        raw, norm = M.choice_predictions(lls, choices)
        samples = [
            {"line": n, "loglikelihoods": ll, "prediction": p, "answer": a}
            for n, ll, p, a in zip(lines, lls, raw, answers, strict=True)
        ]
        if spec.type == "multiple_choice":
            out = {"acc": M.accuracy(raw, answers), "acc_norm": M.accuracy(norm, answers)}
        else:
            predicted = [labels[p] for p in raw]
            for s, p in zip(samples, predicted, strict=True):
                s["prediction"] = p
            out = {
                "acc": M.accuracy(predicted, answers),
                "macro_f1": M.macro_f1(predicted, answers),
            }
    elif spec.type == "generation":
        texts = [s[0]["text"] for s in slots]
        refs = [references(r) for r in rows]
        em = [M.exact_match_score(t, r) for t, r in zip(texts, refs, strict=True)]
        f1 = [M.token_f1_score(t, r) for t, r in zip(texts, refs, strict=True)]
        out = {"exact_match": M.mean_stderr(em), "f1": M.mean_stderr(f1)}
        samples = [
            {"line": n, "generated": t, "references": r, "exact_match": e, "f1": f}
            for n, t, r, e, f in zip(lines, texts, refs, em, f1, strict=True)
        ]
    elif spec.type == "perplexity":
        lls = [s[0]["loglikelihood"] for s in slots]
        toks = [s[0]["tokens"] for s in slots]
        if bytes_per_token is not None:  # packed val blocks: bytes apportioned by tokens
            out = M.language_modelling(lls, toks, [t * bytes_per_token for t in toks])
        else:
            texts = [r["text"] for r in rows]
            out = M.language_modelling(
                lls, toks, [M.count_bytes(t) for t in texts], [M.count_words(t) for t in texts]
            )
        samples = [
            {"line": n, "loglikelihood": ll, "tokens": t}
            for n, ll, t in zip(lines, lls, toks, strict=True)
        ]
    else:  # bias_pairs
        more = [s[0]["loglikelihood"] for s in slots]
        less = [s[1]["loglikelihood"] for s in slots]
        prefers = [float(a > b) for a, b in zip(more, less, strict=True)]
        share = M.mean_stderr(prefers)
        ci = M.proportion_ci(int(sum(prefers)), len(prefers))
        out = {
            "pct_stereotype": M.Metric(share.value, share.stderr, share.n, ci),
            "likelihood_diff": M.mean_stderr([abs(a - b) for a, b in zip(more, less, strict=True)]),
        }
        samples = [
            {"line": n, "bias_type": r.get("bias_type", ""), "ll_more": a, "ll_less": b}
            for n, r, a, b in zip(lines, rows, more, less, strict=True)
        ]
    return {k: v for k, v in out.items() if k in spec.metric_names}, samples
