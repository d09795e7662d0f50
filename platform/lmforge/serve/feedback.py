"""`POST /v1/feedback`: a user's rating (and correction) of one completion.

    {"completion_id": "chatcmpl-...", "rating": 1, "correction": null, "tags": ["helpful"]}

The record goes to the feedback store of the request log (always, never sampled) and to
`lmforge_feedback_total{model, model_version, rating}`. `"stored": true` is answered only once
the row is durable (fsynced to the replica's feedback journal; `request_log.durable_feedback`);
a row that could not be written is a 503, so the client retries. The model and version are those that
answered the completion when this API replica still remembers it (a bounded cache of recent
completion ids), else null: the improvement job joins feedback to the request log by id. The
record carries the id of the key that sent it and whether that key is trusted
(ServeArgs.trusted_keys): by default only trusted feedback trains the next model.
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request
from pydantic import ConfigDict, Field, field_validator

from lmforge.serve.middleware import key_of
from lmforge.serve.protocol import APIError, Body
from lmforge.serve.requestlog import utcnow


class FeedbackRequest(Body):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(
        ..., min_length=1, max_length=200, description="the `id` of the rated response"
    )
    rating: float = Field(..., ge=-1, le=1, description="+1 thumbs up, -1 thumbs down, or between")
    correction: str | None = Field(
        None, max_length=100_000, description="the answer the user wanted instead"
    )
    tags: list[str] | None = Field(
        None, max_length=32, description="free labels, e.g. 'wrong', 'unsafe', 'helpful'"
    )

    @field_validator("rating", mode="before")
    @classmethod
    def _a_number(cls, value):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number in [-1, 1] (+1 thumbs up, -1 thumbs down)")
        return value

    @field_validator("tags")
    @classmethod
    def _short_tags(cls, tags):
        if tags and any(len(t) > 100 for t in tags):
            raise ValueError("each tag must be at most 100 characters")
        return tags


def rating_label(rating: float) -> str:
    return "positive" if rating > 0 else "negative" if rating < 0 else "neutral"


def add_feedback_route(app: FastAPI) -> None:
    @app.post("/v1/feedback", summary="rate a completion (thumbs up/down, a correction)")
    async def feedback(request: Request, body: FeedbackRequest):
        state = request.app.state
        request_log = state.request_log
        model, version = request_log.lookup(body.completion_id)
        record = {
            "feedback_id": f"fb-{uuid.uuid4().hex}",
            "completion_id": body.completion_id,
            "time": utcnow(),
            "rating": float(body.rating),
            "correction": body.correction,
            "tags": body.tags,
            "model": model,
            "model_version": version,
            "key_id": key_of(request),
            "trusted": key_of(request) in state.trusted_keys,
        }
        try:
            stored = await request_log.store_feedback(record)
        except OSError as e:
            raise APIError(
                503,
                f"the feedback could not be stored ({e}); retry later",
                type="server_error",
                code="feedback_not_stored",
                headers={"Retry-After": str(state.limits.retry_after_s)},
            ) from None
        state.metrics.feedback.labels(
            model or "unknown", version or "unknown", rating_label(body.rating)
        ).inc()
        return {
            "id": record["feedback_id"],
            "object": "feedback",
            "created": int(time.time()),
            "completion_id": body.completion_id,
            "rating": record["rating"],
            "model": model,
            "model_version": version,
            "stored": stored,
        }
