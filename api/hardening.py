"""Checks applied before any route runs: uploads authenticated before their body is read (401), body
size (413), JSON nesting depth (422); and the headers every response carries (no framing).

A body over the limit is refused from its Content-Length when it has one, and by counting the bytes
as they arrive when it has not (chunked uploads), so nothing over the limit is read into memory or
written to disk. JSON bodies are small (max_body_bytes): they are read whole and their nesting is
measured before the JSON parser sees them (a deep document would otherwise exhaust its recursion).
"""

from __future__ import annotations

import re
from typing import Any

import anyio
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import INVALID_TOKEN, MISSING_TOKEN, lookup_token
from api.errors import Unauthorized, error_body, json_reply

BODY_METHODS = {"POST", "PUT", "PATCH"}
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped; no parsing)."""
    depth = deepest = 0
    for b in _BRACKETS.findall(_STRING.sub(b"", raw)):
        if b in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class RequestLimits:
    """ASGI middleware: 413 over `max_body` (`max_upload` on upload paths), 422 over `max_depth`."""

    def __init__(
        self, app: ASGIApp, *, max_body: int, max_upload: int, max_depth: int, upload_paths: frozenset[str]
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.max_upload = max_upload
        self.max_depth = max_depth
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in self.upload_paths
        limit = self.max_upload if upload else self.max_body
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await json_reply(send, 413, _too_large(limit))
            return
        # Uploads stream through (counted); other bodies are JSON-sized and read whole for the depth check.
        if not upload and ("json" in headers.get("content-type", "") or not headers.get("content-type")):
            body, more = await _read_upto(receive, limit)
            if more:
                await json_reply(send, 413, _too_large(limit))
                return
            if json_depth(body) > self.max_depth:
                msg = f"JSON nested deeper than {self.max_depth} levels is refused"
                await json_reply(send, 422, error_body(msg, ["body"], "too_deep"))
                return
            await self.app(scope, _replay(body, receive), send)
            return
        await self.app(scope, _counting(receive, limit), send)


def _too_large(limit: int) -> dict[str, Any]:
    return error_body(f"request body is larger than {limit} bytes", ["body"], "too_large")


async def _read_upto(receive: Receive, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the client's disconnect, as usual

    return replayed


def _counting(receive: Receive, limit: int) -> Receive:
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                # Raised inside body parsing: FastAPI passes HTTPExceptions through to the handlers.
                raise HTTPException(413, _too_large(limit)["detail"])
        return message

    return counted


class AuthFirst:
    """ASGI middleware: an upload (a multipart body, or a path in `upload_paths`) is authenticated before
    its body is read, so an anonymous client or a bad token costs one token look-up, never a spooled body.

    The principal found goes to the route in `request.state.principal` (`current_user` takes it).
    """

    def __init__(self, app: ASGIApp, *, upload_paths: frozenset[str]) -> None:
        self.app = app
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        multipart = headers.get("content-type", "").lower().startswith("multipart/")
        if not multipart and scope["path"] not in self.upload_paths:
            await self.app(scope, receive, send)
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await _unauthorized(send, MISSING_TOKEN)
            return
        state = scope["app"].state
        principal = await anyio.to_thread.run_sync(lookup_token, state, token.strip())
        if principal is None:
            await _unauthorized(send, INVALID_TOKEN)
            return
        state.admission.identify(scope, principal.name)
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _unauthorized(send: Send, msg: str) -> None:
    # Answered without reading the body: the server closes the connection instead of draining it.
    error = Unauthorized(msg)
    await json_reply(send, 401, error_body(error.msg, error.loc, error.type), error.headers)


class SecurityHeaders:
    """ASGI middleware: every response forbids framing (clickjacking of the dashboard's cancel button)
    and content-type sniffing, and sends no referrer."""

    HEADERS = (
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy", b"frame-ancestors 'none'"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_wrapper)
