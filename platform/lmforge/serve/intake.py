"""What a request may send before any route sees it: the body's size, the time to send it, and
room for it among the requests in flight.

The body is read here, whole, before the app runs: a declared Content-Length over the limit is
refused (413) before a byte of it is read, a chunked body as soon as it grows past the limit,
and a body still incomplete after `body_timeout_s` (a client trickling its upload) gets 408.
The concurrency checks (429) come before the body too, and requests still uploading count
against them, so slow uploads cannot queue up in front of the generation routes and `/health`:
the replica's `max_concurrent_requests`, and the API key's `key_max_concurrent_requests` (the
key's id is in the scope: the auth middleware runs first), which the intake holds from here to
the end of the response, so one key's uploads cannot take the other keys' slots.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse

from lmforge.serve.config import ANONYMOUS
from lmforge.serve.middleware import KEY_ID
from lmforge.serve.protocol import APIError
from lmforge.serve.streams import overloaded

# Methods whose body is read and limited (the others carry none that the API uses).
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class IntakeMiddleware:
    """Body size and read-time limits, and admission before the body (`state`: the app's
    state, with `limits`, `inflight` (generating requests), `receiving` (uploading) and
    `quotas` (each key's requests in flight, counted here))."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state
        state.receiving = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        state, limits = self.state, self.state.limits
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                error = APIError(
                    400, "the Content-Length header is not a number", code="bad_length"
                )
                return await _answer(error, scope, receive, send)
            if declared > limits.max_body_bytes:
                return await _answer(_too_large(declared, limits), scope, receive, send)
        key = scope.get(KEY_ID) or ANONYMOUS
        try:
            state.quotas.enter(key)
        except APIError as e:
            return await _answer(e, scope, receive, send)
        try:
            if state.inflight + state.receiving >= limits.max_concurrent_requests:
                error = overloaded(
                    429,
                    f"too many concurrent requests (limit {limits.max_concurrent_requests})",
                    limits,
                )
                return await _answer(error, scope, receive, send)
            await self._receive_and_run(scope, receive, send)
        finally:
            state.quotas.leave(key)

    async def _receive_and_run(self, scope, receive, send) -> None:
        state = self.state
        state.receiving += 1
        try:
            body = await self._read_body(receive, state.limits)
        except APIError as e:
            return await _answer(e, scope, None, send)
        finally:
            state.receiving -= 1
        if body is None:  # the client left while sending: nobody to answer
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _read_body(self, receive, limits) -> bytes | None:
        deadline = time.monotonic() + limits.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise APIError(
                    408,
                    f"the request body was not received within {limits.body_timeout_s:g} s "
                    f"({size} bytes came); send it at once, or raise limits.body_timeout_s",
                    type="timeout_error",
                    code="body_timeout",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise _too_large(size, limits, partial=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(size: int, limits, partial: bool = False) -> APIError:
    what = "grew past the limit" if partial else f"is {size} bytes; the limit is"
    return APIError(
        413,
        f"the request body {what} {limits.max_body_bytes} bytes (limits.max_body_bytes): "
        "send fewer or shorter prompts",
        code="body_too_large",
        headers={"Connection": "close"},
    )


async def _answer(error: APIError, scope, receive, send) -> None:
    response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
    await response(scope, receive, send)
