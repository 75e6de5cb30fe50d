"""The one error hierarchy of pyrio.

Every service raises these; the RPC layer carries them across the wire by
their `kind`, and crigw maps each kind to a gRPC status code in exactly one
place (services/crigw/status.py).
"""

from __future__ import annotations

from typing import Any


class PyrioError(Exception):
    """Base class: an error with a message a person can act on."""

    kind = "Internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message}

    def __str__(self) -> str:
        return self.message


class NotFound(PyrioError):
    kind = "NotFound"


class AlreadyExists(PyrioError):
    kind = "AlreadyExists"


class InvalidArgument(PyrioError):
    kind = "InvalidArgument"


class FailedPrecondition(PyrioError):
    kind = "FailedPrecondition"


class Unavailable(PyrioError):
    kind = "Unavailable"


class DeadlineExceeded(PyrioError):
    kind = "DeadlineExceeded"


class Unauthenticated(PyrioError):
    kind = "Unauthenticated"


class PermissionDenied(PyrioError):
    kind = "PermissionDenied"


class ResourceExhausted(PyrioError):
    kind = "ResourceExhausted"


class Unimplemented(PyrioError):
    kind = "Unimplemented"


class Internal(PyrioError):
    kind = "Internal"


ERROR_KINDS: dict[str, type[PyrioError]] = {
    cls.kind: cls
    for cls in (
        NotFound,
        AlreadyExists,
        InvalidArgument,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unimplemented,
        Internal,
    )
}


def error_from_wire(payload: dict[str, Any]) -> PyrioError:
    """Rebuild the typed error a remote service raised."""
    cls = ERROR_KINDS.get(str(payload.get("kind")), Internal)
    return cls(str(payload.get("message", "")))
