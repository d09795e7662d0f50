"""One generation request as the request log, the drift monitor and the version header see
it, and the app's monitoring state (request log, drift monitor, model info) with its shutdown."""

from __future__ import annotations

import contextlib
import json
import time

from fastapi import FastAPI, Request

from lmforge.serve.config import ServeArgs
from lmforge.serve.drift import DriftMonitor, ServedModelInfo
from lmforge.serve.requestlog import RequestLog, utcnow
from lmforge.serve.streams import Backend


def model_info(backend: Backend) -> ServedModelInfo:
    """A backend's version and validation bpb (unknown for backends that do not say)."""
    return getattr(backend, "info", None) or ServedModelInfo()


def add_monitoring(
    app: FastAPI, backends: dict[str, Backend], args: ServeArgs, replica: str | None
) -> None:
    """The request log, the drift monitor and the model info metric of an app."""
    state, c = app.state, args.request_log
    state.request_log = RequestLog(
        c.path,
        c.sample_rate,
        c.flush_rows,
        c.flush_seconds,
        c.redact_pii,
        replica=replica,
        recent_completions=c.recent_completions,
        durable_feedback=c.durable_feedback,
        spool=c.spool_dir,
    )
    state.drift = DriftMonitor(args.drift, state.metrics)
    for name, backend in backends.items():
        info = model_info(backend)
        state.metrics.model_info.labels(name, info.version or "unknown").set(1)
        state.drift.set_validation(name, info.val_bpb)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.metrics.close()
    app.state.drift.close()
    app.state.request_log.close()  # graceful shutdown: what is buffered is written


class RequestTrace:
    """One generation request as the request log and the drift monitor see it: its first
    prompt and first choice, usage, latency and final status."""

    def __init__(self, request: Request, backend: Backend, endpoint: str, prompt: str) -> None:
        self.state, self.backend = request.app.state, backend
        self.endpoint, self.prompt = endpoint, prompt
        self.time, self.start = utcnow(), time.monotonic()
        self.version = model_info(backend).version
        self.rid = ""  # the response id, once the generation started
        self.messages: list[dict] | None = None  # chat: the request's messages
        self.text, self.finish_reason = "", None  # of choice 0
        self.ended = False

    def headers(self) -> dict[str, str]:
        return {"x-lmforge-model-version": self.version or "unknown"}

    def add(self, k: int, out) -> None:
        """A streamed output of choice k."""
        if k == 0:
            self.text += out.text
            self.finish_reason = out.finish_reason or self.finish_reason

    def end(self, status: int, usage: dict | None = None) -> None:
        """Log the request (if sampled), remember who answered it, and offer its prompt to the
        drift monitor; once, however the request ended."""
        if self.ended:
            return
        self.ended = True
        usage = usage or {}
        name, request_log = self.backend.name, self.state.request_log
        request_log.remember(self.rid, name, self.version)
        request_log.record_request(
            {
                "completion_id": self.rid,
                "time": self.time,
                "endpoint": self.endpoint,
                "model": name,
                "model_version": self.version,
                "messages_json": None if self.messages is None else json.dumps(self.messages),
                "prompt": self.prompt,
                "completion": self.text,
                "finish_reason": self.finish_reason,
                "latency_s": time.monotonic() - self.start,
                "prompt_tokens": usage.get("prompt_tokens", 0),
                "completion_tokens": usage.get("completion_tokens", 0),
                "status": status,
            }
        )
        score = getattr(self.backend, "score", None)
        if status == 200 and score is not None:
            self.state.drift.offer(self.rid, name, self.prompt, score)
