"""Single-use tokens for the requests the CRI handed out streaming URLs for.

As the kubelet's request cache: a token is random, stands for exactly one
stored request of one kind, is consumed by its first use (right or wrong),
and expires after a TTL; at most MAX_IN_FLIGHT may wait to be used.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

from common.errors import ResourceExhausted

MAX_IN_FLIGHT = 1000


class RequestCache:
    """Single-use tokens for stored requests, expiring after `ttl` seconds."""

    def __init__(self, ttl: float, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.ttl = ttl
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, str, dict[str, Any]]] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._entries:
            token, (expires, _, _) = next(iter(self._entries.items()))
            if expires > now:
                break
            del self._entries[token]

    def insert(self, kind: str, request: dict[str, Any]) -> str:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if len(self._entries) >= self.max_in_flight:
                raise ResourceExhausted(
                    f"too many streaming requests in flight ({self.max_in_flight}); retry after some are used or expire"
                )
            token = base64.urlsafe_b64encode(secrets.token_bytes(18)).decode().rstrip("=")
            self._entries[token] = (now + self.ttl, kind, request)
            return token

    def consume(self, token: str, kind: str) -> dict[str, Any] | None:
        """The request stored for this token and kind, at most once; None otherwise."""
        with self._lock:
            self._expire(time.monotonic())
            entry = self._entries.pop(token, None)
        if entry is None or entry[1] != kind:
            return None
        return entry[2]
