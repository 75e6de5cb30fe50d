"""The one place where pyrio's typed errors become gRPC status codes.

Every CRI handler runs through `serve_cri_call`, which also writes the one
structured log line per call (method, duration, result code).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable

import grpc

from common.errors import PyrioError

log = logging.getLogger("pyrio.crigw.cri")

GRPC_CODE_BY_KIND: dict[str, grpc.StatusCode] = {
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "AlreadyExists": grpc.StatusCode.ALREADY_EXISTS,
    "InvalidArgument": grpc.StatusCode.INVALID_ARGUMENT,
    "FailedPrecondition": grpc.StatusCode.FAILED_PRECONDITION,
    "Unavailable": grpc.StatusCode.UNAVAILABLE,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "Unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "PermissionDenied": grpc.StatusCode.PERMISSION_DENIED,
    "ResourceExhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "Internal": grpc.StatusCode.INTERNAL,
}


# An error message quotes the values it is about; one far longer than any
# real id, name or path is cut, so a huge input never comes back whole in
# grpc-message (past the client's metadata limit, the client would see
# RESOURCE_EXHAUSTED instead of the real code: issue 15 item 11).
MAX_ECHOED_VALUE_CHARS = 256
ECHOED_VALUE_KEPT_CHARS = 64
MAX_MESSAGE_CHARS = 4096
_LONG_VALUE = re.compile(r"\S{%d,}" % (MAX_ECHOED_VALUE_CHARS + 1))


def bounded_message(message: str) -> str:
    """`message` with every overlong word cut to its start and its length."""
    message = _LONG_VALUE.sub(
        lambda match: f"{match.group()[:ECHOED_VALUE_KEPT_CHARS]}...({len(match.group())} chars)", message
    )
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + f"... (message cut at {MAX_MESSAGE_CHARS} chars)"
    return message


def grpc_code_for(error: PyrioError) -> grpc.StatusCode:
    return GRPC_CODE_BY_KIND.get(error.kind, grpc.StatusCode.INTERNAL)


# Called with (method, gRPC code name, seconds) after every CRI call (services/crigw/metrics.py).
CALL_OBSERVERS: list[Callable[[str, str, float], None]] = []


def serve_cri_call(
    method: str,
    handler: Callable[[Any, grpc.ServicerContext], Any],
    request: Any,
    context: grpc.ServicerContext,
) -> Any:
    started = time.monotonic()
    code = grpc.StatusCode.OK
    message = ""
    try:
        return handler(request, context)
    except PyrioError as exc:
        code, message = grpc_code_for(exc), bounded_message(exc.message)
    except Exception as exc:  # a bug answers INTERNAL, never kills the gateway
        log.exception("unhandled error in %s", method)
        code, message = grpc.StatusCode.INTERNAL, bounded_message(f"{method}: {type(exc).__name__}: {exc}")
    finally:
        for observe in CALL_OBSERVERS:
            observe(method, code.name, time.monotonic() - started)
        log.info(
            "cri call",
            extra={
                "method": method,
                "duration_ms": round((time.monotonic() - started) * 1000, 3),
                "code": code.name,
                **({"error": message} if code != grpc.StatusCode.OK else {}),
            },
        )
    context.abort(code, message)
