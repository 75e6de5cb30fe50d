"""Free space the image store keeps for the node.

The kubelet evicts pods and collects images when a filesystem runs low; a
pull must not be what takes the last of it. `DiskReserve` refuses a pull
that would leave the store's filesystem with less than
`image.free_space_reserve` bytes, before the download (from the sizes the
manifest declares) and while it writes (a layer may expand to far more than
its blob).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from common.errors import ResourceExhausted

# How many bytes a guarded writer lets through between two looks at statvfs.
CHECK_EVERY_BYTES = 16 << 20


class DiskReserve:
    def __init__(self, path: str, reserve_bytes: int) -> None:
        self.path = path
        self.reserve_bytes = reserve_bytes

    def free_bytes(self) -> int:
        info = os.statvfs(self.path)
        return info.f_bavail * info.f_frsize

    def require(self, more_bytes: int, what: str) -> None:
        """Raise ResourceExhausted unless `more_bytes` can still be written
        without going below the reserve.

        RESOURCE_EXHAUSTED is gRPC's code for "out of space": the kubelet
        logs it as the pull's failure and retries with backoff, by which
        time its image GC or eviction may have freed the disk."""
        free = self.free_bytes()
        if free - more_bytes < self.reserve_bytes:
            needs = f"needs {more_bytes} more bytes, but " if more_bytes else ""
            raise ResourceExhausted(
                f"{what}: {needs}the image store's filesystem ({self.path}) has {free} bytes free and "
                f"{self.reserve_bytes} are kept for the node (image.free_space_reserve); nothing was stored. "
                "Free space or remove unused images"
            )


class GuardedWriter:
    """A file that checks the reserve every CHECK_EVERY_BYTES written."""

    def __init__(self, output: BinaryIO, reserve: DiskReserve, what: str) -> None:
        self.output = output
        self.reserve = reserve
        self.what = what
        self._unchecked = 0

    def write(self, data: bytes) -> int:
        self._unchecked += len(data)
        if self._unchecked >= CHECK_EVERY_BYTES:
            self._unchecked = 0
            self.reserve.require(0, self.what)
        return self.output.write(data)
