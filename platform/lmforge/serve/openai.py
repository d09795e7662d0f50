"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, tokenizer, health, metrics.

`create_app(backends, args)` builds the app over a dict of model backends: an in-process
`LocalBackend` (one Engine, no Ray: tests, benchmarks, `lmforge serve --no-ray`), or the Serve
deployment handles of lmforge.serve.app. Everything a client can get wrong is answered in the
OpenAI error envelope with a 4xx status before any model work; nothing a client sends can
cause a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.model import chat
from lmforge.model.generate import SamplingParams
from lmforge.serve.config import LimitsConfig, ServeArgs
from lmforge.serve.engine import Engine, EngineOverloaded, Output
from lmforge.serve.metrics import MetricsMiddleware, ServeMetrics
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from lmforge.serve.render import chat_chunk, chat_response, completion_choice, logprob_state

log = logging.getLogger(__name__)
OPEN_PATHS = {"/health"}  # the only routes that need no API key


class Backend(Protocol):
    """A served model as the API sees it: its tokenizer, context length and token stream."""

    name: str
    tokenizer: Any
    max_seq_len: int

    def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Output]: ...

    async def healthy(self) -> bool: ...


class LocalBackend:
    """An Engine in this process."""

    def __init__(self, name: str, engine: Engine) -> None:
        self.name, self.engine = name, engine.start()
        self.tokenizer, self.max_seq_len = engine.tokenizer, engine.max_seq_len

    def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        return self.engine.stream(prompt, params)

    async def healthy(self) -> bool:
        return self.engine.healthy()


def local_app(args: ServeArgs) -> FastAPI:
    """The API over engines in this process (no Ray): tests, benchmarks, `serve --no-ray`."""
    from lmforge.serve.engine import load_engine

    backends = {m.name: LocalBackend(m.name, load_engine(m)) for m in args.models}
    return create_app(backends, args)


# ---------------------------------------------------------------- one choice, with limits


class Generation:
    """The choices of one request: opened together, timed out together, metered."""

    def __init__(self, app_state, backend: Backend, route: str, slot: _Slot) -> None:
        self.state, self.backend, self.route = app_state, backend, route
        # The concurrency slot is freed when the last choice ends, however it ends: also when
        # a client leaves before its stream was ever read (the event loop then closes them).
        self.slot, self.open_choices = slot, 0
        self.start = time.monotonic()
        self.deadline = self.start + app_state.limits.request_timeout_s

    def finished(self) -> None:
        """Record the end-to-end latency of a request that completed."""
        latency = self.state.metrics.latency.labels(self.backend.name, self.route)
        latency.observe(time.monotonic() - self.start)

    async def open(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[AsyncIterator]:
        """Start every choice and wait for its first output, so that overload and timeouts
        before the first token are proper HTTP errors rather than mid-stream ones."""
        gens = [self._outputs(ids, params) for ids, params in jobs]
        self.open_choices = len(gens)
        firsts = await asyncio.gather(*(anext(g) for g in gens), return_exceptions=True)
        errors = [e for e in firsts if isinstance(e, BaseException)]
        if errors:
            await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
            raise errors[0]
        return [_prepend(first, g) for first, g in zip(firsts, gens, strict=True)]

    async def _outputs(self, ids: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        m, model = self.state.metrics, self.backend.name
        m.prompt_tokens.labels(model).inc(len(ids))
        gauge = m.waiting.labels(model)
        gauge.inc()
        stream = self.backend.generate(ids, params)
        try:
            while True:
                out = await self._next(stream)
                if out is None:
                    return
                if gauge is m.waiting.labels(model):
                    gauge.dec()
                    gauge = m.running.labels(model)
                    gauge.inc()
                    m.ttft.labels(model).observe(time.monotonic() - self.start)
                if out.tokens:
                    m.generation_tokens.labels(model).inc(len(out.tokens))
                    m.batch_size.labels(model).observe(out.batch_size)
                if out.finish_reason == "error":
                    raise APIError(500, out.error or "generation failed", type="server_error")
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            gauge.dec()
            self.open_choices -= 1
            if self.open_choices == 0:
                self.slot.release()
            await stream.aclose()  # cancels the request in the engine if it is unfinished

    async def _next(self, stream) -> Output | None:
        limits: LimitsConfig = self.state.limits
        try:
            return await asyncio.wait_for(anext(stream), max(self.deadline - time.monotonic(), 0))
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise APIError(
                504,
                f"the request did not finish within {limits.request_timeout_s:g} s",
                type="timeout_error",
                code="timeout",
            ) from None
        except EngineOverloaded as e:
            raise overloaded(503, f"model {self.backend.name} is overloaded: {e}", limits) from None


async def _prepend(first: Output, rest: AsyncIterator[Output]) -> AsyncIterator[Output]:
    try:
        yield first
        if first.finish_reason is None:
            async for out in rest:
                yield out
    finally:
        await rest.aclose()


async def merge(gens: list[AsyncIterator[Output]]) -> AsyncIterator[tuple[int, Output]]:
    """Interleave several choices' outputs as they come, tagged with the choice index."""
    if len(gens) == 1:  # the common case: no pump task and queue hop per token
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator[Output]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def overloaded(status: int, message: str, limits: LimitsConfig) -> APIError:
    return APIError(
        status,
        message,
        type="overloaded_error" if status == 503 else "rate_limit_error",
        code="overloaded" if status == 503 else "too_many_requests",
        headers={"Retry-After": str(limits.retry_after_s)},
    )


# ---------------------------------------------------------------- the app


def create_app(backends: dict[str, Backend], args: ServeArgs) -> FastAPI:
    app = FastAPI(
        title="lmforge OpenAI-compatible API",
        version="1",
        description="Completions and chat over lmforge model artifacts, with continuous batching.",
    )
    app.state.backends, app.state.limits = backends, args.limits
    app.state.metrics = ServeMetrics()
    app.state.inflight = 0
    _add_error_handlers(app)
    _add_routes(app)
    routes = {getattr(r, "path", "") for r in app.routes}
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=routes)
    app.add_middleware(AuthMiddleware, keys=args.api_keys())
    return app


class AuthMiddleware:
    """Bearer API keys on every route but /health (also on the docs, the spec and 404s)."""

    def __init__(self, app, keys: set[str]) -> None:
        self.app, self.keys = app, sorted(keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys:
            path, root = scope.get("path", ""), scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :] or "/"
            if path not in OPEN_PATHS and not self._valid(scope):
                error = APIError(
                    401,
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                headers = {"WWW-Authenticate": "Bearer"}
                response = JSONResponse(error.body(), status_code=401, headers=headers)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _valid(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # Compare against every key, always, so the timing does not reveal a partial match.
        return sum(hmac.compare_digest(token.strip(), k) for k in self.keys) > 0


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return JSONResponse(validation_error(e.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        error = APIError(e.status_code, str(e.detail), type=kind)
        return JSONResponse(error.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        log.exception("unhandled error")
        error = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
        return JSONResponse(error.body(), status_code=500)


def validation_error(errors) -> APIError:
    """The first pydantic problem, as a 400 that names the field."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if not loc:  # the body itself: missing, or not an object
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    param = loc[0]
    where = ".".join(p for p in loc if not p.startswith(("str", "list[", "int")))
    return APIError(400, f"{where}: {first.get('msg')}", param=param, code="invalid_value")


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


class _Slot:
    """One of the replica's `max_concurrent_requests`: 429 + Retry-After when none is free."""

    def __init__(self, state) -> None:
        if state.inflight >= state.limits.max_concurrent_requests:
            raise overloaded(
                429,
                f"too many concurrent requests (limit {state.limits.max_concurrent_requests})",
                state.limits,
            )
        self.state, self.held = state, True
        state.inflight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.inflight -= 1


def _check_lengths(
    backend: Backend, limits: LimitsConfig, n_prompt: int, max_tokens: int, param: str
) -> None:
    cap = min(limits.max_prompt_tokens or backend.max_seq_len, backend.max_seq_len)
    if n_prompt > cap:
        raise APIError(
            400,
            f"the prompt has {n_prompt} tokens; the limit is {cap}",
            param=param,
            code="context_length_exceeded",
        )
    if n_prompt + max_tokens > backend.max_seq_len:
        raise APIError(
            400,
            f"this model's maximum context length is {backend.max_seq_len} tokens, but "
            f"{n_prompt + max_tokens} were requested ({n_prompt} in the prompt, {max_tokens} for "
            "the completion); shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )


def _check_counts(limits: LimitsConfig, n: int, max_tokens: int) -> None:
    if n > limits.max_n:
        raise APIError(400, f"n is {n}; the limit is {limits.max_n}", param="n")
    if max_tokens > limits.max_tokens:
        raise APIError(
            400, f"max_tokens is {max_tokens}; the limit is {limits.max_tokens}", param="max_tokens"
        )


def _prompts(
    body: CompletionRequest, tokenizer, limits: LimitsConfig
) -> list[tuple[str, list[int]]]:
    """(text, ids) of each prompt, whatever form the request used."""
    p = body.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    if len(items) > limits.max_prompts:
        raise APIError(
            400, f"{len(items)} prompts; the limit is {limits.max_prompts}", param="prompt"
        )
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, tokenizer.encode(item, add_special_tokens=False).ids))
        else:
            vocab = tokenizer.get_vocab_size()
            if any(t < 0 or t >= vocab for t in item):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            out.append((tokenizer.decode(item, skip_special_tokens=False), list(item)))
    return out


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _stream_response(events: AsyncIterator[str], slot: _Slot, gen: Generation) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield event
            gen.finished()
        except APIError as e:  # the status line is already sent: an error event, then [DONE]
            yield _sse(e.body())
        except Exception as e:
            log.exception("stream failed")
            yield _sse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body())
        finally:
            slot.release()
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream")


def _add_routes(app: FastAPI) -> None:
    @app.get("/health", summary="liveness: 200 when every model can generate")
    async def health(request: Request):
        states = {n: await b.healthy() for n, b in request.app.state.backends.items()}
        ok = all(states.values())
        return JSONResponse(
            {"status": "ok" if ok else "unhealthy", "models": states}, 200 if ok else 503
        )

    @app.get("/metrics", summary="Prometheus metrics (lmforge_*)")
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(
            generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/v1/models", summary="the served models")
    async def models(request: Request):
        data = [
            {
                "id": n,
                "object": "model",
                "created": 0,
                "owned_by": "lmforge",
                "max_model_len": b.max_seq_len,
            }
            for n, b in request.app.state.backends.items()
        ]
        return {"object": "list", "data": data}

    @app.get("/tokenizer_info", summary="tokenizer details (vLLM-compatible)")
    async def tokenizer_info(request: Request, model: str | None = None):
        backend = _backend(request, model)
        tok = backend.tokenizer
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": backend.max_seq_len,
            "vocab_size": tok.get_vocab_size(),
            "bos_token": "<|bos|>",
            "eos_token": "<|eos|>",
            "pad_token": "<|pad|>",
            "chat_template": chat.CHAT_TEMPLATE,
        }

    @app.post("/tokenize", summary="text or chat -> token ids (vLLM-compatible)")
    async def tokenize(request: Request, body: TokenizeRequest):
        backend = _backend(request, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        text = body.prompt
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = chat.render(messages, add_generation_prompt=body.add_generation_prompt)
        ids = backend.tokenizer.encode(text, add_special_tokens=body.add_special_tokens).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": backend.max_seq_len}

    @app.post("/detokenize", summary="token ids -> text (vLLM-compatible)")
    async def detokenize(request: Request, body: DetokenizeRequest):
        backend = _backend(request, body.model)
        vocab = backend.tokenizer.get_vocab_size()
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": backend.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions", summary="OpenAI completions")
    async def completions(request: Request, body: CompletionRequest):
        return await _completions(request, body)

    @app.post("/v1/chat/completions", summary="OpenAI chat completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await _chat(request, body)


async def _completions(request: Request, body: CompletionRequest):
    state = request.app.state
    backend, limits = _backend(request, body.model), state.limits
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    _check_counts(limits, body.n, max_tokens)
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 is only allowed with echo", param="max_tokens")
    prompts = _prompts(body, backend.tokenizer, limits)
    for _, ids in prompts:
        _check_lengths(backend, limits, len(ids), max_tokens, "prompt")
    jobs = [
        (ids, body.sampling(max_tokens, body.logprobs, body.echo, j))
        for _, ids in prompts
        for j in range(body.n)
    ]
    slot = _Slot(state)
    generation = Generation(state, backend, "/v1/completions", slot)
    try:
        gens = await generation.open(jobs)
    except BaseException:
        slot.release()
        raise
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    texts = [prompts[k // body.n][0] for k in range(len(jobs))]
    tok = backend.tokenizer
    if body.stream:
        return _stream_response(
            _completion_events(body, gens, texts, tok, rid, created), slot, generation
        )
    try:
        results = await _collect_all(gens)
    finally:
        slot.release()
    generation.finished()
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
    for k, outs in enumerate(results):
        lp = logprob_state(tok) if body.logprobs is not None else None
        text = (texts[k] if body.echo else "") + "".join(o.text for o in outs)
        choices.append(completion_choice(k, text, outs, lp, outs[-1].finish_reason))
        if k % body.n == 0:
            usage["prompt_tokens"] += outs[-1].prompt_tokens
        usage["completion_tokens"] += outs[-1].completion_tokens
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": usage,
    }


async def _completion_events(body, gens, texts, tok, rid, created) -> AsyncIterator[str]:
    lps = [logprob_state(tok) if body.logprobs is not None else None for _ in gens]
    started = [False] * len(gens)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    async for k, out in merge(gens):
        prefix = texts[k] if body.echo and not started[k] else ""
        started[k] = True
        if not (out.tokens or out.text or prefix or out.finish_reason or out.prompt_logprobs):
            continue
        choice = completion_choice(k, prefix + out.text, [out], lps[k], out.finish_reason)
        yield _sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [choice],
            }
        )
        if out.finish_reason is not None:
            usage["prompt_tokens"] += out.prompt_tokens if k % body.n == 0 else 0
            usage["completion_tokens"] += out.completion_tokens
    if (body.stream_options or {}).get("include_usage"):
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        yield _sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [],
                "usage": usage,
            }
        )


async def _chat(request: Request, body: ChatRequest):
    state = request.app.state
    backend, limits = _backend(request, body.model), state.limits
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    ids = backend.tokenizer.encode(chat.render(messages, add_generation_prompt=True)).ids
    asked = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    max_tokens = (
        asked if asked is not None else min(limits.max_tokens, backend.max_seq_len - len(ids))
    )
    _check_counts(limits, body.n, max_tokens)
    _check_lengths(backend, limits, len(ids), max_tokens, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs = [(ids, body.sampling(max_tokens, logprobs, False, j)) for j in range(body.n)]
    slot = _Slot(state)
    generation = Generation(state, backend, "/v1/chat/completions", slot)
    try:
        gens = await generation.open(jobs)
    except BaseException:
        slot.release()
        raise
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return _stream_response(
            _chat_events(body, gens, backend.tokenizer, rid, created), slot, generation
        )
    try:
        results = await _collect_all(gens)
    finally:
        slot.release()
    generation.finished()
    return chat_response(rid, created, body.model, results, backend.tokenizer, logprobs is not None)


async def _chat_events(body, gens, tok, rid, created) -> AsyncIterator[str]:
    started = [False] * len(gens)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    with_lp = body.logprobs
    async for k, out in merge(gens):
        if not started[k]:
            started[k] = True
            yield _sse(
                chat_chunk(rid, created, body.model, k, {"role": "assistant", "content": ""})
            )
        if out.text or out.finish_reason or (with_lp and out.tokens):
            delta = {"content": out.text} if out.text else {}
            yield _sse(chat_chunk(rid, created, body.model, k, delta, out, tok, with_lp))
        if out.finish_reason is not None:
            usage["prompt_tokens"] = out.prompt_tokens
            usage["completion_tokens"] += out.completion_tokens
    if (body.stream_options or {}).get("include_usage"):
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        chunk = chat_chunk(rid, created, body.model, 0, {})
        chunk.update(choices=[], usage=usage)
        yield _sse(chunk)


async def _collect_all(gens: list[AsyncIterator[Output]]) -> list[list[Output]]:
    async def collect(gen):
        return [out async for out in gen]

    tasks = [asyncio.create_task(collect(g)) for g in gens]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
