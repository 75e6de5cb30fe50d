"""Which containers' inits (and shims) are alive, without reading /proc for each.

A container's state is derived from its files and processes (records.py:
`ContainerStore.state`), which costs an exit-file open and a /proc read per
container. ListContainers asks that for every container every second, so the
answers that cannot change without a process exiting are kept here:
- an init once seen alive with its shim is held, with the shim, by pidfds
  (immune to PID reuse); one poll over all of them says which container lost
  either since (then the full derivation runs again);
- an exit record, once read, is final (the shim writes it once, atomically).

This is a cache of the kernel's and the files' answers: a restarted shimd
starts empty and fills it again from them.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Any, Callable


class InitWatch:
    def __init__(self) -> None:
        self._pidfds: dict[str, list[int]] = {}
        self._ids_by_fd: dict[int, str] = {}
        self._poll = select.poll()
        self._exits: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def exit_record(self, container_id: str) -> dict[str, Any] | None:
        return self._exits.get(container_id)

    def remember_exit(self, container_id: str, exit_record: dict[str, Any]) -> None:
        with self._lock:
            self._exits[container_id] = exit_record
            self._drop(container_id)

    def alive(self, container_id: str) -> bool:
        """True when the container's processes are held and none has exited."""
        with self._lock:
            fds = self._pidfds.get(container_id)
            if fds is None:
                return False
            if select.select(fds, [], [], 0)[0]:
                self._drop(container_id)
                return False
            return True

    def alive_ids(self) -> set[str]:
        """The held inits that have not exited, after one poll over all of them."""
        with self._lock:
            for fd, _events in self._poll.poll(0):
                container_id = self._ids_by_fd.get(fd)
                if container_id is not None:
                    self._drop(container_id)
            return set(self._pidfds)

    def watch(self, container_id: str, pids: list[int], still_same: Callable[[], bool]) -> None:
        """Hold `pids` (the init and its shim) while all live; `still_same()` is
        checked after the pidfds are open, so a PID reused meanwhile is never held."""
        if container_id in self._pidfds or not all(pids):
            return
        fds: list[int] = []
        try:
            for pid in pids:
                fds.append(os.pidfd_open(pid))
        except OSError:
            for fd in fds:
                os.close(fd)
            return
        with self._lock:
            if container_id in self._pidfds or not still_same():
                for fd in fds:
                    os.close(fd)
                return
            self._pidfds[container_id] = fds
            for fd in fds:
                self._ids_by_fd[fd] = container_id
                self._poll.register(fd, select.POLLIN)

    def forget(self, container_id: str) -> None:
        with self._lock:
            self._exits.pop(container_id, None)
            self._drop(container_id)

    def _drop(self, container_id: str) -> None:
        for fd in self._pidfds.pop(container_id, []):
            self._ids_by_fd.pop(fd, None)
            self._poll.unregister(fd)
            os.close(fd)
