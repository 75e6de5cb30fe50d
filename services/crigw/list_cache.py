"""Relisting without re-sending or re-converting what has not changed.

The kubelet lists every sandbox and container every second. Apart from its
state, a listed item never changes (ids are never reused; metadata, labels,
annotations, image and creation time are fixed at create), so:
- the owning daemon answers a brief list: `[id, state]` pairs from its index;
- crigw asks for the full records only of ids it has not seen;
- each item's serialized protobuf is kept by (id, state), and the response
  is those bytes joined under the repeated field's tag, passed to gRPC as is.

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
    """Serialized list items of one kind (sandboxes or containers), by id and state."""

    def __init__(self, encode: Callable[[dict[str, Any], Any], bytes]) -> None:
        # encode(record, state) -> the item's serialized protobuf
        self._encode = encode
        self._records: dict[str, dict[str, Any]] = {}
        self._encoded: dict[tuple[str, Any], bytes] = {}
        self._lock = threading.Lock()

    def response_bytes(
        self,
        brief: list[list[Any]],
        fetch: Callable[[list[str]], list[dict[str, Any]]],
        complete: bool,
    ) -> bytes:
        """The serialized list response for `brief` ([id, state] pairs, in order).

        fetch(ids) returns the full records of ids not seen yet (an id missing
        from its answer was removed meanwhile and is left out). `complete` says
        the brief list was unfiltered, so ids absent from it are gone."""
        with self._lock:
            missing = [item_id for item_id, _ in brief if item_id not in self._records]
        if missing:
            fetched = {record["id"]: record for record in fetch(missing)}
            with self._lock:
                if len(self._records) + len(fetched) > MAX_CACHED_ITEMS:
                    self._records.clear()
                    self._encoded.clear()
                self._records.update(fetched)
        parts = []
        with self._lock:
            records, encoded = self._records, self._encoded
            for item_id, state in brief:
                data = encoded.get((item_id, state))
                if data is None:
                    record = records.get(item_id)
                    if record is None:
                        continue  # removed between the brief list and the fetch
                    data = encoded[(item_id, state)] = self._encode(record, state)
                parts.append(REPEATED_FIELD_ONE_TAG + _varint(len(data)) + data)
            if complete:
                self._forget_except({item_id for item_id, _ in brief})
        return b"".join(parts)

    def _forget_except(self, listed: set[str]) -> None:
        if self._records.keys() <= listed:
            return
        for item_id in [item_id for item_id in self._records if item_id not in listed]:
            del self._records[item_id]
        for key in [key for key in self._encoded if key[0] not in listed]:
            del self._encoded[key]
