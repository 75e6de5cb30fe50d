"""Pods' network figures (CRI NetworkUsage) from their pinned namespaces.

A file of /proc/<tid>/net/ holds the network namespace it was opened in
for as long as it is open (seq_open_net takes a reference), so each pod's
/proc/thread-self/net/dev is opened once, by a short-lived thread that
setns()'d into the pinned namespace, and later reads are a pread on that
descriptor: no namespace is entered per call, and a pod with no running
container still has its figures. The descriptors are a cache only (lost
harmlessly at a restart) and must be closed when the pod's network goes,
or they would keep its namespace alive: `forget` is called at stop and
remove, and every read closes those of pods no longer asked about.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from common.net_dev import network_usage
from services.netd.namespaces import CLONE_FLAGS, _in_dedicated_thread, _setns

READ_BYTES = 256 * 1024


class NetworkStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # sandbox id -> (fd of its net/dev, inode of the pinned namespace it was opened for)
        self._open: dict[str, tuple[int, int]] = {}

    def usage(self, ready: dict[str, str], wanted: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """sandbox id -> NetworkUsage of the `wanted` pods (all when None),
        given every ready pod as {sandbox id: pinned netns path}; pods whose
        namespace cannot be read are left out."""
        with self._lock:
            for gone in [sandbox_id for sandbox_id in self._open if sandbox_id not in ready]:
                os.close(self._open.pop(gone)[0])
            found = {}
            for sandbox_id, netns in ready.items():
                if wanted is not None and sandbox_id not in wanted:
                    continue
                fd = self._fd_for(sandbox_id, netns)
                if fd is None:
                    continue
                try:
                    usage = network_usage(os.pread(fd, READ_BYTES, 0).decode("utf-8", "replace"))
                except OSError:
                    continue
                if usage is not None:
                    found[sandbox_id] = usage
            return found

    def _fd_for(self, sandbox_id: str, netns: str) -> int | None:
        try:
            inode = os.stat(netns).st_ino
        except OSError:
            self._drop(sandbox_id)
            return None
        cached = self._open.get(sandbox_id)
        if cached is not None and cached[1] == inode:
            return cached[0]
        self._drop(sandbox_id)
        try:
            fd = _open_net_dev_in(netns)
        except OSError:
            return None
        self._open[sandbox_id] = (fd, inode)
        return fd

    def _drop(self, sandbox_id: str) -> None:
        cached = self._open.pop(sandbox_id, None)
        if cached is not None:
            os.close(cached[0])

    def forget(self, sandbox_id: str) -> None:
        """Before a pod's network goes: let its namespace be freed."""
        with self._lock:
            self._drop(sandbox_id)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()


def _open_net_dev_in(netns: str) -> int:
    def work() -> int:
        ns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # The thread ends right after: no need to return to netd's namespace.
            _setns(ns_fd, CLONE_FLAGS["net"])
        finally:
            os.close(ns_fd)
        return os.open("/proc/thread-self/net/dev", os.O_RDONLY | os.O_CLOEXEC)

    return int(_in_dedicated_thread(work))
