"""OpenAI's error envelope under /v1: `{"error": {"message", "type", "param", "code"}}`.

Every error of the app is made in the one trainbox shape (api/errors.py, and the middlewares that answer
before a route: 401 for uploads, 413, 429). Under /v1 this middleware rewrites that shape into OpenAI's
envelope on its way out, so each rule keeps one implementation and the two views cannot drift apart. A 422
(a request the checks refuse) is OpenAI's 400; every other status stays as it is.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError

PREFIX = "/v1"


class BadRequest(ApiError):
    """400: a request /v1 refuses (a wrong purpose, an unsupported method, a file of the wrong kind)."""

    status_code = 400
    type = "invalid_request_error"


_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}
# Where a trainbox error says it applies (`loc`) starts with the part of the request; OpenAI's `param`
# names the field only.
_PARTS = {"body", "query", "path", "header"}


def envelope(status: int, detail: Any) -> tuple[int, dict[str, Any]]:
    """The trainbox error body `{"detail": [...]}` (or a plain detail) as OpenAI's envelope, and its status."""
    first = detail[0] if isinstance(detail, list) and detail and isinstance(detail[0], dict) else {}
    message = "; ".join(str(d.get("msg", "")) for d in detail if isinstance(d, dict)) if first else str(detail)
    loc = [str(p) for p in first.get("loc", []) if p is not None]
    if loc and loc[0] in _PARTS:
        loc = loc[1:]
    kind = str(first.get("type") or "") or None
    status = 400 if status == 422 else status
    if status >= 500:
        error_type = "server_error"
    elif kind == "limit_exceeded":
        error_type = "insufficient_quota"
    else:
        error_type = _TYPES.get(status, "invalid_request_error")
    code = _CODES.get(status) if kind in (None, "unauthorized", "not_found", "rate_limited") else kind
    error = {"message": message, "type": error_type, "param": ".".join(loc) or None, "code": code}
    return status, {"error": error}


class OpenAIErrors:
    """ASGI middleware: error responses to /v1 requests, rewritten into OpenAI's envelope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and b"json" in headers.get(b"content-type", b""):
                    start = message  # held until the body is complete
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status, body = start["status"], b"".join(chunks)
            try:
                detail = json.loads(body).get("detail")
            except (ValueError, AttributeError):
                detail = None
            if detail is not None:
                status, converted = envelope(status, detail)
                body = json.dumps(converted).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)
