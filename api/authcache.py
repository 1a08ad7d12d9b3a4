"""Authenticated tokens remembered for a few seconds, so a request costs no token look-up.

The bound: a revoked or expired token, a deleted user or changed limits take effect within
TRAINBOX_AUTH_CACHE_S (default 5 s) in every API process, and at once in the process that made the
change through the API (its routes clear the cache). 0 turns the cache off. Keys are hashes of the
tokens; failed look-ups are not remembered.
"""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import datetime

from core.models import utcnow
from core.users import Principal

MAX_ENTRIES = 10_000


class AuthCache:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[bytes, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, token: str, *, now: datetime | None = None) -> Principal | None:
        """The token's user if it was authenticated less than ttl_s ago and has not expired since."""
        if self.ttl_s <= 0:
            return None
        key = self._key(token)
        with self._lock:
            hit = self._entries.get(key)
        if hit is None:
            return None
        principal, until = hit
        expires = principal.token_expires_at
        if time.monotonic() >= until or (expires is not None and expires <= (now or utcnow())):
            with self._lock:
                self._entries.pop(key, None)
            return None
        return principal

    def put(self, token: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[self._key(token)] = (principal, time.monotonic() + self.ttl_s)

    def clear(self) -> None:
        """Forget every token: a token, a user or a user's limits changed."""
        with self._lock:
            self._entries.clear()
