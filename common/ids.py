"""CRI object ids: 64 hex characters, accepted by unique prefix (as CRI-O does)."""

from __future__ import annotations

import os
from typing import Iterable

from common.errors import InvalidArgument, NotFound


def new_id() -> str:
    # os.urandom is what secrets.token_hex reads; the secrets module would
    # pull hmac and hashlib into every daemon for this one call.
    return os.urandom(32).hex()


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
