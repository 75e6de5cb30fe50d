"""Registry of CRI handlers, filled by the per-area modules.

A handler is `def handler(gateway, request) -> response`, registered with
`@cri_handler("RunPodSandbox")`. The area modules (sandboxes, containers,
images, streaming, stats, runtime_info) are imported by `server.py`; any CRI
method without a handler answers UNIMPLEMENTED naming the method.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

Handler = Callable[[Any, Any], Any]

# The CRI call a gRPC worker thread serves (its deadline, time.time(), and
# its context), for handlers whose downstream work should end when the
# kubelet stops waiting: past the deadline, or when it cancels the call.
_call = threading.local()


def set_call(context: Any) -> None:
    remaining = context.time_remaining()
    _call.deadline = None if remaining is None else time.time() + remaining
    _call.context = context


def call_time_remaining(longest: float) -> float:
    """Seconds the current CRI caller still waits, at most `longest`."""
    deadline = getattr(_call, "deadline", None)
    return longest if deadline is None else max(0.0, min(longest, deadline - time.time()))


def current_context() -> Any:
    """The gRPC context of the CRI call this thread serves (None outside one)."""
    return getattr(_call, "context", None)


def on_call_end(callback: Callable[[], None]) -> None:
    """Run `callback` when the current CRI call ends, however it ends
    (answered, cancelled by the client, deadline passed)."""
    context = getattr(_call, "context", None)
    if context is not None:
        context.add_callback(callback)


HANDLERS: dict[str, Handler] = {}


def cri_handler(method: str) -> Callable[[Handler], Handler]:
    def register(function: Handler) -> Handler:
        if method in HANDLERS:
            raise RuntimeError(f"two handlers for CRI method {method}")
        HANDLERS[method] = function
        return function

    return register
