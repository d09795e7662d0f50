"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, tokenizer, health, metrics.

`create_app(backends, args)` builds the app over a dict of model backends: an in-process
`LocalBackend` (one Engine, no Ray: tests, benchmarks, `lmforge serve --no-ray`), or the Serve
deployment handles of lmforge.serve.app. Everything a client can get wrong is answered in the
OpenAI error envelope with a 4xx status before any model work; nothing a client sends can
cause a 500.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmforge.model import chat
from lmforge.serve.config import LimitsConfig, ServeArgs
from lmforge.serve.drift import served_model_info
from lmforge.serve.feedback import add_feedback_route
from lmforge.serve.intake import IntakeMiddleware
from lmforge.serve.limits import KeyQuotas, check_chars, check_counts, check_lengths
from lmforge.serve.metrics import MetricsMiddleware, ServeMetrics
from lmforge.serve.middleware import AuthMiddleware, add_error_handlers, key_of
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from lmforge.serve.render import (
    chat_chunk,
    chat_response,
    completion_choice,
    completion_response,
    logprob_state,
)
from lmforge.serve.streams import Backend, Generation, LocalBackend, Slot, collect_all, merge
from lmforge.serve.trace import RequestTrace, add_monitoring, lifespan, model_info

log = logging.getLogger(__name__)


def local_app(args: ServeArgs) -> FastAPI:
    """The API over engines in this process (no Ray): tests, benchmarks, `serve --no-ray`."""
    from lmforge.model.artifact import resolve_artifact
    from lmforge.serve.engine import load_engine

    backends = {
        m.name: LocalBackend(
            m.name,
            load_engine(m),
            served_model_info(resolve_artifact(m.artifact), m.val_bpb),
            args.drift,
        )
        for m in args.models
    }
    return create_app(backends, args)


# ---------------------------------------------------------------- the app


def create_app(
    backends: dict[str, Backend],
    args: ServeArgs,
    replica: str | None = None,
    ray_metrics: bool = False,
) -> FastAPI:
    """The API over `backends`; `replica` names this process in request-log file names;
    `ray_metrics` also exports the metrics through Ray's metrics agent (under Serve)."""
    app = FastAPI(
        title="lmforge OpenAI-compatible API",
        version="1",
        description="Completions and chat over lmforge model artifacts, with continuous batching.",
        lifespan=lifespan,
    )
    app.state.backends, app.state.limits = backends, args.limits
    app.state.metrics = ServeMetrics(ray=ray_metrics)
    app.state.inflight, app.state.quotas = 0, KeyQuotas(args.limits)
    add_monitoring(app, backends, args, replica)
    add_error_handlers(app)
    _add_routes(app)
    add_feedback_route(app)
    routes = {getattr(r, "path", "") for r in app.routes}
    # The last added runs first: metrics (counts 401s too), then auth (no body is read for a
    # request without a key), then the intake that reads the body under its limits.
    app.add_middleware(IntakeMiddleware, state=app.state)
    keys = args.api_keys()
    app.state.trusted_keys = args.trusted_key_ids(keys)
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=routes)
    return app


def _backend(request: Request, name: str | None) -> Backend:
    backends: dict[str, Backend] = request.app.state.backends
    if name is None:
        return next(iter(backends.values()))
    if name not in backends:
        raise APIError(
            404,
            f"the model '{name}' does not exist; served: {', '.join(backends)}",
            param="model",
            code="model_not_found",
        )
    return backends[name]


def _chat_prompt(
    backend: Backend, messages: list[dict], add_generation_prompt: bool
) -> tuple[str, list[int]]:
    """(text, ids) of a chat prompt in the model's own template (or the built-in format); a
    conversation the template refuses (its raise_exception, e.g. roles that must alternate) is
    the client's 400."""
    from jinja2 import TemplateError

    try:
        return backend.special.encode_chat(backend.tokenizer, messages, add_generation_prompt)
    except (ValueError, TemplateError) as e:
        raise APIError(400, f"messages: {e}", param="messages") from None


def _prompt_items(body: CompletionRequest) -> list:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    return [p] if p and isinstance(p[0], int) else list(p)


def _prompts(
    body: CompletionRequest, backend: Backend, limits: LimitsConfig
) -> list[tuple[str, list[int]]]:
    """(text, ids) of each prompt, whatever form the request used."""
    items = _prompt_items(body)
    if len(items) > limits.max_prompts:
        raise APIError(
            400, f"{len(items)} prompts; the limit is {limits.max_prompts}", param="prompt"
        )
    for item in items:
        if isinstance(item, str):
            check_chars(backend, limits, len(item), "prompt")
    out, tokenizer = [], backend.tokenizer
    for item in items:
        if isinstance(item, str):  # with BOS first where the model's tokenizer adds one
            out.append((item, backend.special.encode_prompt(tokenizer, item)))
        else:
            vocab = tokenizer.get_vocab_size()
            if any(t < 0 or t >= vocab for t in item):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            out.append((tokenizer.decode(item, skip_special_tokens=False), list(item)))
    return out


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _stream_response(
    events: AsyncIterator[str], slot: Slot, gen: Generation, trace: RequestTrace, usage: dict
) -> StreamingResponse:
    async def body():
        status = 499  # the client left before the end
        try:
            async for event in events:
                yield event
            gen.finished()
            status = 200
        except APIError as e:  # the status line is already sent: an error event, then [DONE]
            status = e.status
            yield _sse(e.body())
        except Exception as e:
            log.exception("stream failed")
            status = 500
            yield _sse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body())
        finally:
            slot.release()
            trace.end(status, usage)
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers=trace.headers())


async def _collect(slot: Slot, generation: Generation, gens, trace: RequestTrace):
    """Every output of a non-streamed request; a failure is logged with its status."""
    try:
        results = await collect_all(gens)
    except APIError as e:
        trace.end(e.status)
        raise
    except asyncio.CancelledError:
        trace.end(499)  # the client left
        raise
    except BaseException:
        trace.end(500)
        raise
    finally:
        slot.release()
    generation.finished()
    for out in results[0]:
        trace.add(0, out)
    return results


def _add_routes(app: FastAPI) -> None:
    @app.get("/health", summary="liveness: 200 when every model can generate")
    async def health(request: Request):
        states = {n: await b.healthy() for n, b in request.app.state.backends.items()}
        ok = all(states.values())
        return JSONResponse(
            {"status": "ok" if ok else "unhealthy", "models": states}, 200 if ok else 503
        )

    # This process's metrics; under Ray, Ray's metrics port has every router replica's.
    @app.get("/metrics", summary="Prometheus metrics (lmforge_*)")
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(
            generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/playground", summary="a chat page to try the models and rate answers")
    async def playground():
        from lmforge.serve.playground import playground_response

        return playground_response()

    @app.get("/v1/models", summary="the served models")
    async def models(request: Request):
        data = [
            {
                "id": n,
                "object": "model",
                "created": 0,
                "owned_by": "lmforge",
                "max_model_len": b.max_seq_len,
                "version": model_info(b).version,
            }
            for n, b in request.app.state.backends.items()
        ]
        return {"object": "list", "data": data}

    @app.get("/tokenizer_info", summary="tokenizer details (vLLM-compatible)")
    async def tokenizer_info(request: Request, model: str | None = None):
        backend = _backend(request, model)
        tok, special = backend.tokenizer, backend.special
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": backend.max_seq_len,
            "vocab_size": tok.get_vocab_size(),
            "bos_token": special.bos_token,
            "eos_token": special.eos_token,
            "pad_token": "<|pad|>" if tok.token_to_id("<|pad|>") is not None else None,
            "chat_template": special.chat_template or chat.CHAT_TEMPLATE,
        }

    @app.post("/tokenize", summary="text or chat -> token ids (vLLM-compatible)")
    async def tokenize(request: Request, body: TokenizeRequest):
        backend = _backend(request, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        # The ids the chat and completions routes would use for the same input; encoded in a
        # worker thread, as everywhere: a long text must not stall the event loop.
        limits = request.app.state.limits
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            check_chars(backend, limits, sum(len(m["content"]) for m in messages), "messages")
            _, ids = await asyncio.to_thread(
                _chat_prompt, backend, messages, body.add_generation_prompt
            )
        else:
            check_chars(backend, limits, len(body.prompt), "prompt")
            if body.add_special_tokens:
                encode = backend.special.encode_prompt
                ids = await asyncio.to_thread(encode, backend.tokenizer, body.prompt)
            else:
                encoding = await asyncio.to_thread(
                    backend.tokenizer.encode, body.prompt, add_special_tokens=False
                )
                ids = encoding.ids
        return {"tokens": ids, "count": len(ids), "max_model_len": backend.max_seq_len}

    @app.post("/detokenize", summary="token ids -> text (vLLM-compatible)")
    async def detokenize(request: Request, body: DetokenizeRequest):
        backend = _backend(request, body.model)
        vocab = backend.tokenizer.get_vocab_size()
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        text = await asyncio.to_thread(
            backend.tokenizer.decode, body.tokens, skip_special_tokens=False
        )
        return {"prompt": text}

    @app.post("/v1/completions", summary="OpenAI completions")
    async def completions(request: Request, body: CompletionRequest):
        return await _completions(request, body)

    @app.post("/v1/chat/completions", summary="OpenAI chat completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await _chat(request, body)


async def _start_generation(request: Request, backend, route: str, jobs):
    """Take a concurrency slot (the replica's and the key's) and submit the jobs, tagged with
    the key so the engine shares its batch fairly among keys; the slot is released if
    submitting fails."""
    state, key = request.app.state, key_of(request)
    reserved = sum(len(ids) + params.max_tokens for ids, params in jobs)
    jobs = [(ids, dataclasses.replace(params, tenant=key)) for ids, params in jobs]
    slot = Slot(state, key, reserved)
    generation = Generation(state, backend, route, slot)
    try:
        return slot, generation, await generation.open(jobs)
    except BaseException:
        slot.release()
        raise


async def _completions(request: Request, body: CompletionRequest):
    state = request.app.state
    backend, limits = _backend(request, body.model), state.limits
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 is only allowed with echo", param="max_tokens")
    check_counts(limits, body, max_tokens, len(_prompt_items(body)))
    prompts = await asyncio.to_thread(_prompts, body, backend, limits)  # off the event loop
    for _, ids in prompts:
        check_lengths(backend, limits, len(ids), max_tokens, "prompt")
    jobs = [
        (ids, body.sampling(max_tokens, body.logprobs, body.echo, j))
        for _, ids in prompts
        for j in range(body.n)
    ]
    trace = RequestTrace(request, backend, "completions", prompts[0][0])
    slot, generation, gens = await _start_generation(request, backend, "/v1/completions", jobs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    trace.rid = rid
    texts = [prompts[k // body.n][0] for k in range(len(jobs))]
    tok = backend.tokenizer
    if body.stream:
        usage: dict = {}
        events = _completion_events(body, gens, texts, tok, rid, created, trace, usage)
        return _stream_response(events, slot, generation, trace, usage)
    results = await _collect(slot, generation, gens, trace)
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
    for k, outs in enumerate(results):
        lp = logprob_state(tok) if body.logprobs is not None else None
        text = (texts[k] if body.echo else "") + "".join(o.text for o in outs)
        choices.append(completion_choice(k, text, outs, lp, outs[-1].finish_reason))
        if k % body.n == 0:
            usage["prompt_tokens"] += outs[-1].prompt_tokens
        usage["completion_tokens"] += outs[-1].completion_tokens
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    trace.end(200, usage)
    response = completion_response(rid, created, body.model, trace.version, choices, usage)
    return JSONResponse(response, headers=trace.headers())


async def _completion_events(
    body, gens, texts, tok, rid, created, trace: RequestTrace, usage: dict
) -> AsyncIterator[str]:
    lps = [logprob_state(tok) if body.logprobs is not None else None for _ in gens]
    started = [False] * len(gens)
    usage.update(prompt_tokens=0, completion_tokens=0)
    async for k, out in merge(gens):
        trace.add(k, out)
        prefix = texts[k] if body.echo and not started[k] else ""
        started[k] = True
        if not (out.tokens or out.text or prefix or out.finish_reason or out.prompt_logprobs):
            continue
        choice = completion_choice(k, prefix + out.text, [out], lps[k], out.finish_reason)
        yield _sse(completion_response(rid, created, body.model, trace.version, [choice]))
        if out.finish_reason is not None:
            usage["prompt_tokens"] += out.prompt_tokens if k % body.n == 0 else 0
            usage["completion_tokens"] += out.completion_tokens
    if (body.stream_options or {}).get("include_usage"):
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        yield _sse(completion_response(rid, created, body.model, trace.version, [], usage))


async def _chat(request: Request, body: ChatRequest):
    state = request.app.state
    backend, limits = _backend(request, body.model), state.limits
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    check_chars(backend, limits, sum(len(m["content"]) for m in messages), "messages")
    rendered, ids = await asyncio.to_thread(_chat_prompt, backend, messages, True)
    asked = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    max_tokens = (
        asked if asked is not None else min(limits.max_tokens, backend.max_seq_len - len(ids))
    )
    check_counts(limits, body, max_tokens)
    check_lengths(backend, limits, len(ids), max_tokens, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs = [(ids, body.sampling(max_tokens, logprobs, False, j)) for j in range(body.n)]
    trace = RequestTrace(request, backend, "chat", rendered)
    trace.messages = messages
    route = "/v1/chat/completions"
    slot, generation, gens = await _start_generation(request, backend, route, jobs)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    trace.rid = rid
    if body.stream:
        usage: dict = {}
        events = _chat_events(body, gens, backend.tokenizer, rid, created, trace, usage)
        return _stream_response(events, slot, generation, trace, usage)
    results = await _collect(slot, generation, gens, trace)
    tok, with_lp = backend.tokenizer, logprobs is not None
    response = chat_response(rid, created, body.model, results, tok, with_lp)
    response["system_fingerprint"] = trace.version
    trace.end(200, response["usage"])
    return JSONResponse(response, headers=trace.headers())


async def _chat_events(
    body, gens, tok, rid, created, trace: RequestTrace, usage
) -> AsyncIterator[str]:
    started = [False] * len(gens)
    usage.update(prompt_tokens=0, completion_tokens=0)
    with_lp = body.logprobs

    def sse(chunk: dict) -> str:
        chunk["system_fingerprint"] = trace.version
        return _sse(chunk)

    async for k, out in merge(gens):
        trace.add(k, out)
        if not started[k]:
            started[k] = True
            yield sse(chat_chunk(rid, created, body.model, k, {"role": "assistant", "content": ""}))
        if out.text or out.finish_reason or (with_lp and out.tokens):
            delta = {"content": out.text} if out.text else {}
            yield sse(chat_chunk(rid, created, body.model, k, delta, out, tok, with_lp))
        if out.finish_reason is not None:
            usage["prompt_tokens"] = out.prompt_tokens
            usage["completion_tokens"] += out.completion_tokens
    if (body.stream_options or {}).get("include_usage"):
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        chunk = chat_chunk(rid, created, body.model, 0, {})
        chunk.update(choices=[], usage=usage)
        yield sse(chunk)
