"""Pacing downloads: a floor on the transfer rate, and slots shared fairly.

A registry that dribbles (a byte a second never trips a no-progress timeout)
must neither hold a download for ever nor take every download slot of the
node: `RateFloor` fails a download whose bytes over a window fall below
`image.min_download_rate`, and `DownloadSlots` caps the downloads one
registry may run at once below the node's total, so a pull from another
registry always finds a slot.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from common.errors import DeadlineExceeded, PyrioError

# How often a download waiting for a slot looks whether it is still wanted.
SLOT_POLL_SECONDS = 0.5


class Cancelled(PyrioError):
    """A download stopped because nobody needs it any more (a sibling
    download of the same pull failed, or every caller's deadline passed)."""

    kind = "Unavailable"


class RateFloor:
    """Raises DeadlineExceeded once a window's bytes fall below the floor."""

    def __init__(self, min_rate: int, window: float, what: str, host: str) -> None:
        self.min_rate = min_rate
        self.window = window
        self.what = what
        self.host = host
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def count(self, size: int) -> None:
        if self.min_rate <= 0:
            return
        self._window_bytes += size
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed < self.window:
            return
        if self._window_bytes < self.min_rate * elapsed:
            raise DeadlineExceeded(
                f"{self.what}: download too slow, {self._window_bytes} bytes from {self.host} in the last "
                f"{elapsed:.0f}s, below image.min_download_rate ({self.min_rate} bytes/s over "
                f"image.download_rate_window {self.window:g}s)"
            )
        self._window_start, self._window_bytes = now, 0


def per_registry_cap(total: int, configured: int) -> int:
    """The configured cap, or by default all slots but one (at least one)."""
    return min(total, configured) if configured > 0 else max(1, total - 1)


class DownloadSlots:
    """At most `total` downloads at once, at most `per_registry` per registry."""

    def __init__(self, total: int, per_registry: int) -> None:
        self.total = total
        self.per_registry = per_registry
        self._active: dict[str, int] = {}
        self._condition = threading.Condition()

    def active(self, registry: str) -> int:
        with self._condition:
            return self._active.get(registry, 0)

    @contextmanager
    def slot(self, registry: str, cancelled: Callable[[], str], what: str) -> Iterator[None]:
        """Hold a slot for `registry`; `cancelled` returns why the download
        is no longer wanted ("" while it is), checked while waiting."""
        with self._condition:
            while sum(self._active.values()) >= self.total or self._active.get(registry, 0) >= self.per_registry:
                reason = cancelled()
                if reason:
                    raise Cancelled(f"{what}: {reason} (it was waiting for a download slot)")
                self._condition.wait(SLOT_POLL_SECONDS)
            self._active[registry] = self._active.get(registry, 0) + 1
        try:
            yield
        finally:
            with self._condition:
                self._active[registry] -= 1
                if not self._active[registry]:
                    del self._active[registry]
                self._condition.notify_all()
