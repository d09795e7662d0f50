"""`GET /playground`: the chat page, with a Content-Security-Policy that lets only its own
inline script and style run and lets it talk only to this API (no page can frame it)."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib.resources import files

from fastapi.responses import HTMLResponse


@functools.cache
def _page() -> tuple[str, str]:
    page = (files("lmforge") / "resources" / "playground" / "index.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        digests = (hashlib.sha256(b.encode()).digest() for b in blocks)
        return " ".join(f"'sha256-{base64.b64encode(d).decode()}'" for d in digests)

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, policy


def playground_response() -> HTMLResponse:
    page, policy = _page()
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return HTMLResponse(page, headers=headers)
