"""Relisting without re-sending or re-converting what has not changed.

The kubelet lists every sandbox and container every second. Apart from its
state, a listed item never changes (ids are never reused; metadata, labels,
annotations, image and creation time are fixed at create), so:
- the owning daemon answers a brief list: `[id, state]` pairs from its index;
- crigw asks for the full records only of ids it has not seen, or whose
  state changed since (rare: a pod stops once, a container exits once);
- each item's serialized protobuf is kept by id with its state, and the
  response is those bytes joined under the repeated field's tag, passed to
  gRPC as is.

The cache holds only what a daemon can give again, so losing it (a crigw
restart) costs one full fetch; a daemon restart changes nothing (its brief
list comes from its state files). Ids no longer listed are dropped at the
next unfiltered list.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

# Both ListPodSandboxResponse.items and ListContainersResponse.containers are
# field 1, length-delimited: tag byte (1 << 3) | 2.
REPEATED_FIELD_ONE_TAG = b"\x0a"
MAX_CACHED_ITEMS = 20000


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class ListCache:
    """Serialized list items of one kind (sandboxes or containers), by id, in their last listed state."""

    def __init__(self, encode: Callable[[dict[str, Any], Any], bytes]) -> None:
        # encode(record, state) -> the item's serialized protobuf
        self._encode = encode
        # id -> (the state it was encoded in, its serialized protobuf framed as
        # one element of the repeated field, so a relist only joins). Only the
        # bytes are kept, not the daemon's record: a few hundred bytes an item
        # instead of kilobytes of dicts (memory per pod, issue 14).
        self._encoded: dict[str, tuple[Any, bytes]] = {}
        self._lock = threading.Lock()

    def response_bytes(
        self,
        brief: list[list[Any]],
        fetch: Callable[[list[str]], list[dict[str, Any]]],
        complete: bool,
    ) -> bytes:
        """The serialized list response for `brief` ([id, state] pairs, in order).

        fetch(ids) returns the full records of ids not seen yet or seen in
        another state (an id missing from its answer was removed meanwhile
        and is left out). `complete` says the brief list was unfiltered, so
        ids absent from it are gone."""
        found: dict[str, bytes] = {}
        stale: list[str] = []
        with self._lock:
            for item_id, state in brief:
                cached = self._encoded.get(item_id)
                if cached is not None and cached[0] == state:
                    found[item_id] = cached[1]
                else:
                    stale.append(item_id)
        if stale:
            states = {item_id: state for item_id, state in brief}
            fresh: dict[str, tuple[Any, bytes]] = {}
            for record in fetch(stale):
                state = states.get(record["id"])
                if state is not None:
                    data = self._encode(record, state)
                    framed = REPEATED_FIELD_ONE_TAG + _varint(len(data)) + data
                    fresh[record["id"]] = (state, framed)
                    found[record["id"]] = framed
            with self._lock:
                if len(self._encoded) + len(fresh) > MAX_CACHED_ITEMS:
                    self._encoded.clear()
                self._encoded.update(fresh)
        parts = [found[item_id] for item_id, _ in brief if item_id in found]
        if complete:
            with self._lock:
                self._forget_except({item_id for item_id, _ in brief})
        return b"".join(parts)

    def _forget_except(self, listed: set[str]) -> None:
        if self._encoded.keys() <= listed:
            return
        for item_id in [item_id for item_id in self._encoded if item_id not in listed]:
            del self._encoded[item_id]
