"""Admission: how much work the API takes on at once, so a flood gets fast 429/503 answers instead of
starving everyone.

Why: routes and their dependencies are sync and run in anyio's worker threads (40). A thread that
waits for a pooled DB connection blocks; once every thread waited, the requests holding connections
could not get a thread to finish and release them, and everything stalled until the pool's 30 s
timeout (then 500). The fix is a bound on requests in flight below both the thread limit and the
DB pool, so no admitted request ever waits for a connection:

- at most `api_max_inflight` requests are handled at once; one more waits up to
  `api_admission_wait_s` for a slot, then gets 503 with Retry-After;
- at most `api_max_inflight_per_user` of them belong to one user (429 with Retry-After at once), so
  one user's flood leaves slots for the others;
- a slot is held until the response starts: a request's DB session is closed by then (`SessionDep`
  ends with the route function), and a Server-Sent Events stream holds none while it streams;
- open SSE streams are counted apart (`api_max_streams`, `api_max_streams_per_user`): each holds a
  Redis connection for its lifetime, and their DB reads share `STREAM_DB_THREADS` threads;
- /healthz is never queued behind the others; its checks have their own thread.

`db_pool_size` and `redis_pool_size` derive the pools from these caps; nothing else sizes them.
The user of a request is known before it is authenticated from its token id (`tbx_<id>_...`), mapped
to the user's name once a request with that token has authenticated; requests without a token count
by client address.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ServiceUnavailable, TooManyRequests, error_body, json_reply
from core.settings import Settings

STREAM_DB_THREADS = 4  # DB reads of every open SSE stream together (state checks, history refills)
HEALTH_DB_THREADS = 1  # the /healthz database check
RETRY_AFTER_S = 1
_RETRY = {"Retry-After": str(RETRY_AFTER_S)}
EXEMPT = frozenset({"/healthz"})  # answered even when every slot is taken (it must tell "busy" from "dead")
_TOKEN_ID = re.compile(rb"^\s*bearer\s+tbx_([0-9a-z]{12})_", re.IGNORECASE)
_KNOWN_TOKENS = 10_000
TICKET = "trainbox.admission"  # the ASGI scope key of a request's admission ticket


def db_pool_size(settings: Settings) -> int:
    """Connections the API's engine keeps: one per admitted request, plus the streams' and health's own."""
    return settings.api_max_inflight + STREAM_DB_THREADS + HEALTH_DB_THREADS


def redis_pool_size(settings: Settings) -> int:
    """Connections of the API's async Redis client: one per open stream (a blocking XREAD) and a few more."""
    return settings.api_max_streams + settings.api_max_inflight + 4


def _add(counts: dict[str, int], key: str, n: int) -> None:
    """Count `n` more for `key`; a key whose count reaches 0 goes (the dicts hold active users only)."""
    if (total := counts.get(key, 0) + n) > 0:
        counts[key] = total
    else:
        counts.pop(key, None)


class Slots:
    """A counting semaphore whose waiters give up after a timeout; bound to no event loop."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[anyio.Event] = deque()

    async def take(self, timeout: float) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        event = anyio.Event()
        self._waiters.append(event)
        try:
            with anyio.move_on_after(timeout):
                await event.wait()
        except BaseException:  # cancelled (the client left) while waiting
            if event.is_set():
                self.give()  # it was handed over just now: pass it on
            else:
                self._waiters.remove(event)
            raise
        if not event.is_set():
            self._waiters.remove(event)
        return event.is_set()

    def give(self) -> None:
        # Hand the slot straight to the oldest waiter (it was removed from the queue by the hand-over).
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self.free += 1


class Admission:
    """The counters: requests in flight (global, per user) and open streams (global, per user)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = Slots(settings.api_max_inflight)
        self.stream_db = anyio.CapacityLimiter(STREAM_DB_THREADS)
        self.health_db = anyio.CapacityLimiter(HEALTH_DB_THREADS)
        self.inflight: dict[str, int] = {}
        self.streams: dict[str, int] = {}
        self.open_streams = 0
        self._users: OrderedDict[bytes, str] = OrderedDict()
        # `identify` runs in the worker thread of the request's auth, the rest on the event loop.
        self._lock = threading.Lock()

    def user_key(self, scope: Scope) -> str:
        """Who a request counts for: the token's user once known, else the token id, else the address."""
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if m := _TOKEN_ID.match(auth):
            token_id = m.group(1)
            with self._lock:
                name = self._users.get(token_id)
            return f"user:{name}" if name is not None else f"token:{token_id.decode()}"
        client = scope.get("client")
        return f"addr:{client[0] if client else '?'}"

    def identify(self, scope: Scope, user: str) -> None:
        """A request authenticated as `user`: its token's later requests, and this one, count for the user."""
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        ticket: dict[str, Any] | None = scope.get(TICKET)
        with self._lock:
            if m := _TOKEN_ID.match(auth):
                self._users[m.group(1)] = user
                self._users.move_to_end(m.group(1))
                while len(self._users) > _KNOWN_TOKENS:
                    self._users.popitem(last=False)
            if ticket is not None and ticket["counted"] and ticket["key"] != f"user:{user}":
                _add(self.inflight, ticket["key"], -1)
                ticket["key"] = f"user:{user}"
                _add(self.inflight, ticket["key"], 1)

    def admit(self, key: str) -> dict[str, Any] | None:
        """Count a request for `key`; None when the user is at their cap. The ticket follows the request."""
        with self._lock:
            if self.inflight.get(key, 0) >= self.settings.api_max_inflight_per_user:
                return None
            _add(self.inflight, key, 1)
            return {"key": key, "counted": True}

    def done(self, ticket: dict[str, Any]) -> None:
        with self._lock:
            if ticket["counted"]:
                ticket["counted"] = False
                _add(self.inflight, ticket["key"], -1)

    def open_stream(self, key: str) -> None:
        """Count one more open SSE stream for `key`; 429/503 over the caps."""
        if self.streams.get(key, 0) >= self.settings.api_max_streams_per_user:
            raise TooManyRequests(
                f"you have {self.settings.api_max_streams_per_user} event streams open, the most one user "
                "may (TRAINBOX_API_MAX_STREAMS_PER_USER); close one first",
                [],
                _RETRY,
            )
        if self.open_streams >= self.settings.api_max_streams:
            raise ServiceUnavailable(
                f"the server has {self.settings.api_max_streams} event streams open (TRAINBOX_API_MAX_STREAMS); "
                "retry later",
                [],
                _RETRY,
            )
        _add(self.streams, key, 1)
        self.open_streams += 1

    def close_stream(self, key: str) -> None:
        self.open_streams -= 1
        _add(self.streams, key, -1)


class AdmissionControl:
    """ASGI middleware: admits a request into a slot (see the module docstring) or answers 429/503 at once."""

    def __init__(self, app: ASGIApp, *, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        adm, settings = self.admission, self.admission.settings
        ticket = adm.admit(adm.user_key(scope))
        if ticket is None:
            msg = (
                f"you have {settings.api_max_inflight_per_user} requests in progress, the most one user may "
                "(TRAINBOX_API_MAX_INFLIGHT_PER_USER); retry after the others finish"
            )
            await json_reply(send, 429, error_body(msg, [], TooManyRequests.type), _RETRY)
            return
        scope[TICKET] = ticket  # authentication moves the count to the user (Admission.identify)
        slot = False

        def release() -> None:
            # Once, at the response's start or the request's end, whichever comes first.
            nonlocal slot
            if slot:
                slot = False
                adm.slots.give()
            adm.done(ticket)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()  # streams and slow readers hold no slot
            await send(message)

        try:
            slot = await adm.slots.take(settings.api_admission_wait_s)
            if not slot:
                msg = f"the server is busy ({settings.api_max_inflight} requests in progress); retry shortly"
                await json_reply(send, 503, error_body(msg, [], ServiceUnavailable.type), _RETRY)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            release()


async def stream_slot(request: Request) -> AsyncIterator[None]:
    """Dependency of a streaming route: one open stream counted for the caller while the response lasts."""
    admission: Admission = request.app.state.admission
    key = admission.user_key(request.scope)
    admission.open_stream(key)
    try:
        yield
    finally:
        admission.close_stream(key)
