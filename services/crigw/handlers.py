"""Registry of CRI handlers, filled by the per-area modules.

A handler is `def handler(gateway, request) -> response`, registered with
`@cri_handler("RunPodSandbox")`. The area modules (sandboxes, containers,
images, streaming, stats, runtime_info) are imported by `server.py`; any CRI
method without a handler answers UNIMPLEMENTED naming the method.
"""

from __future__ import annotations

from typing import Any, Callable

Handler = Callable[[Any, Any], Any]

HANDLERS: dict[str, Handler] = {}


def cri_handler(method: str) -> Callable[[Handler], Handler]:
    def register(function: Handler) -> Handler:
        if method in HANDLERS:
            raise RuntimeError(f"two handlers for CRI method {method}")
        HANDLERS[method] = function
        return function

    return register
