"""One error shape for every error: `{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}`."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from core.jobs import IdempotencyConflict, InvalidCursor, JobNotFound
from core.users import UserError
from trainer.spec import clean_loc

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with a status, a message, where it applies and a machine-readable type."""

    status_code = 400
    type = "bad_request"

    def __init__(
        self,
        msg: str,
        loc: list[str | int] | None = None,
        headers: dict[str, str] | None = None,
        *,
        type_: str | None = None,
    ):
        super().__init__(msg)
        self.msg = msg
        self.loc = loc or []
        self.headers = headers
        if type_ is not None:
            self.type = type_


class Unauthorized(ApiError):
    status_code = 401
    type = "unauthorized"

    def __init__(self, msg: str) -> None:
        super().__init__(msg, ["header", "Authorization"], {"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status_code = 403
    type = "forbidden"


class LimitExceeded(ApiError):
    """A per-user quota or limit; the message names the limit and where it is set."""

    status_code = 403
    type = "limit_exceeded"


class TooManyRequests(ApiError):
    status_code = 429
    type = "rate_limited"


class PayloadTooLarge(ApiError):
    status_code = 413
    type = "too_large"


class NotFound(ApiError):
    status_code = 404
    type = "not_found"


class Conflict(ApiError):
    status_code = 409
    type = "conflict"


class Unprocessable(ApiError):
    status_code = 422
    type = "value_error"


class ServiceUnavailable(ApiError):
    status_code = 503
    type = "unavailable"


# The one error shape as a JSON schema, written out so that routes whose success is not JSON (logs,
# downloads) still document their errors as application/json.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        }
    },
}
_MEANING = {
    401: "no token, or an invalid, revoked or expired one",
    403: "not allowed: a per-user limit (the message names it) or an admin-only action",
    404: "no such resource, or not one the caller may see",
    409: "the Idempotency-Key was used with a different body",
    413: "the request body is over the size limit",
    422: "the request is not valid (the message says what and where)",
    429: "too many submissions; see Retry-After",
    503: "a backing service (Redis) is not available",
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all with the one error shape."""
    content = {"application/json": {"schema": ERROR_SCHEMA}}
    return {code: {"description": _MEANING[code], "content": content} for code in codes}


def error_body(msg: str, loc: list[Any] | None = None, type_: str = "error") -> dict[str, Any]:
    return {"detail": [{"loc": loc or [], "msg": msg, "type": type_}]}


async def json_reply(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """An error answered by a middleware, before any route (the response is sent whole)."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _clean_msg(msg: str) -> str:
    # pydantic prefixes messages of validator-raised ValueErrors; the message itself is what matters.
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = [
        {
            "loc": clean_loc(e.get("loc", [])),
            "msg": _clean_msg(str(e.get("msg", ""))),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.detail, list):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    if exc.status_code == 400:
        # The framework's 400s are bodies it cannot parse (JSON that is not UTF-8, broken multipart).
        # Unparsable JSON is a 422 (json_invalid); so are these: one documented status for a bad body.
        msg = f"request body cannot be parsed: {exc.detail}"
        return JSONResponse(error_body(msg, ["body"], "body_invalid"), status_code=422)
    headers = exc.headers
    allowed = allowed_methods(request) if exc.status_code == 405 else None
    if allowed:
        # Starlette lists only the first route that matched the path; a path can have several.
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    kind = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}
    body = error_body(str(exc.detail), [], kind.get(exc.status_code, "http_error"))
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def allowed_methods(request: Request) -> list[str] | None:
    """The methods the OpenAPI document gives the request's path (the most specific template that
    matches it: /jobs/validate is not /jobs/{job_id}); None for a path it does not describe."""
    best: tuple[int, list[str]] | None = None
    for template, operations in request.app.openapi().get("paths", {}).items():
        params = template.count("{")
        parts = re.split(r"(\{[^}]*\})", template)
        regex = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
        if re.fullmatch(regex, request.url.path) and (best is None or params < best[0]):
            best = (params, [m for m in _METHODS if m.lower() in operations])
    return best[1] if best else None


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _api(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(error_body(exc.msg, exc.loc, exc.type), status_code=exc.status_code, headers=exc.headers)


# Domain exceptions of core, each with its status, where it applies and its type.
_DOMAIN: dict[type[Exception], tuple[int, list[Any], str]] = {
    JobNotFound: (404, ["path", "job_id"], "not_found"),
    IdempotencyConflict: (409, ["header", "Idempotency-Key"], "conflict"),
    InvalidCursor: (422, ["query", "cursor"], "value_error"),
    UserError: (422, ["body"], "value_error"),
}


def _domain(_: Request, exc: Exception) -> JSONResponse:
    status, loc, type_ = next(v for k, v in _DOMAIN.items() if isinstance(exc, k))
    return JSONResponse(error_body(str(exc), loc, type_), status_code=status)


def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal server error", [], "internal_error"), status_code=500)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the one shape."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ApiError, _api)
    for domain_error in _DOMAIN:
        app.add_exception_handler(domain_error, _domain)
    app.add_exception_handler(Exception, _unexpected)
