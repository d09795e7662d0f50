"""API keys and the OpenAI error envelope for every error the app can answer."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.config import ANONYMOUS
from lmforge.serve.protocol import APIError

log = logging.getLogger(__name__)
# The only routes that need no API key: liveness, and the playground's static page (it holds
# no data; the key is typed into it, and every API call it makes sends the key).
OPEN_PATHS = {"/health", "/playground"}
KEY_ID = "lmforge.key_id"  # the scope entry the auth middleware sets


class AuthMiddleware:
    """Bearer API keys on every route but OPEN_PATHS (also on the docs, the spec, 404s and
    WebSocket handshakes). The key's id (never the key) goes into the scope as KEY_ID."""

    def __init__(self, app, keys: dict[str, str]) -> None:
        # Keys compare as UTF-8 bytes: a header is bytes, and a non-ASCII token is just wrong.
        self.app = app
        self.keys = sorted((k.encode("utf-8", "surrogatepass"), i) for k, i in keys.items())

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            key = self._key_id(scope) if self.keys else ANONYMOUS
            path, root = scope.get("path", ""), scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :] or "/"
            if key is None and (path not in OPEN_PATHS or scope["type"] == "websocket"):
                if scope["type"] == "websocket":  # refused in the handshake: HTTP 403
                    return await send({"type": "websocket.close", "code": 1008})
                error = APIError(
                    401,
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                headers = {"WWW-Authenticate": "Bearer"}
                response = JSONResponse(error.body(), status_code=401, headers=headers)
                return await response(scope, receive, send)
            scope[KEY_ID] = key
        await self.app(scope, receive, send)

    def _key_id(self, scope) -> str | None:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return None
        # Compare against every key, always, so the timing does not reveal a partial match.
        found = None
        for key, key_id in self.keys:
            if hmac.compare_digest(token, key):
                found = key_id
        return found


def key_of(request: Request) -> str:
    """The id of the API key that sent `request` (ANONYMOUS on an API without keys)."""
    return request.scope.get(KEY_ID) or ANONYMOUS


def add_error_handlers(app: FastAPI) -> None:
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
    if first.get("type") == "lone_surrogate":
        where = first["ctx"]["where"]
        return APIError(400, first["msg"], param=where.split(".")[0], code="invalid_value")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if not loc:  # the body itself: missing, or not an object
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    param = loc[0]
    where = ".".join(p for p in loc if not p.startswith(("str", "list[", "int")))
    return APIError(400, f"{where}: {first.get('msg')}", param=param, code="invalid_value")
