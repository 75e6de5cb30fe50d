"""CRI object ids: 64 hex characters, accepted by unique prefix (as CRI-O does)."""

from __future__ import annotations

import secrets
from typing import Iterable

from common.errors import InvalidArgument, NotFound


def new_id() -> str:
    return secrets.token_hex(32)


def resolve_id(given: str, known_ids: Iterable[str], kind: str) -> str:
    """The one known id that `given` is, or a unique prefix of.

    Raises InvalidArgument for an empty id and for a prefix that matches
    several objects, NotFound when nothing matches.
    """
    if not given:
        raise InvalidArgument(f"{kind} id must not be empty")
    matches = [known for known in known_ids if known.startswith(given)]
    if given in matches:
        return given
    if not matches:
        raise NotFound(f"{kind} {given!r} not found")
    if len(matches) > 1:
        raise InvalidArgument(f"{kind} id prefix {given!r} is ambiguous: it matches {len(matches)} {kind}s")
    return matches[0]
