"""Giving a daemon's freed memory back to the kernel once it is idle.

After a burst (a relist storm, 100 pods torn down, a pull) glibc keeps the
freed C heap, and CPython's freed arenas leave holes it never returns: the
daemon stays tens of MiB above its idle size. `IdleTrim.maybe_trim()`, called
from a loop that wakes regularly, runs glibc's malloc_trim(0) once the daemon
has been quiet for a while after some activity (issue 14: memory after 200 pods
come and go within 10% of idle).
"""

from __future__ import annotations

import gc
import time

IDLE_SECONDS = 2.0


def _malloc_trim() -> None:
    import ctypes  # only once a trim is due: most daemons load it anyway (mounts)

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


class IdleTrim:
    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._last_activity = 0.0
        self._dirty = False

    def note_activity(self) -> None:
        self._last_activity = time.monotonic()
        self._dirty = True

    def maybe_trim(self, busy: bool = False) -> bool:
        """Trim when there was activity, none for idle_seconds, and none in flight."""
        if not self._dirty or busy or time.monotonic() - self._last_activity < self.idle_seconds:
            return False
        self._dirty = False
        gc.collect()
        _malloc_trim()
        return True
