"""Re-adoption: a new shim for a running container whose shim died.

A shim's death leaves its container running under its keeper
(services/shimd/keeper.py), which holds the container's stdio pipes and
reaps its init. shimd watches every shim through a pidfd; when one ends
while its container's init lives, it spawns a shim with the record's shim
spec plus "adopt": that shim takes the pipes from the keeper
(pidfd_getfd), listens on the same control and attach sockets, and learns
the init's exit from the keeper's records. The watch also runs at shimd's
start, so a shim that died while shimd was down is replaced then.

What the gap loses: the part of a line the dead shim had read but not yet
written (at most one line, 16 KiB per stream), and attach sessions (their
clients reconnect). Output written in the gap waits in the pipe (the
container blocks once 64 KiB are waiting) and reaches the log afterwards.
A tty container's pty master is kept the same way, queued in flight in a
socketpair the keeper holds (keep_tty_with_keeper in shim_setup.py). Not
adopted: containers created before keepers (or their tty queue) existed.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Any

from common.errors import PyrioError
from services.shimd.records import PHASE_CREATED, ContainerStore, process_start_time
from services.shimd.shim_client import spawn_shim

log = logging.getLogger("pyrio.shimd.adoption")

# The watch's poll also picks up new containers this often.
WATCH_INTERVAL_SECONDS = 1.0
ADOPT_TIMEOUT_SECONDS = 30.0


class ShimAdoption:
    def __init__(self, store: ContainerStore) -> None:
        self.store = store
        self._pidfds: dict[str, tuple[int, int]] = {}  # container id -> (shim pid, its pidfd)
        # container id -> the shim pid already dealt with (gone, and nothing to adopt)
        self._settled: dict[str, int] = {}
        self._thread = threading.Thread(target=self._watch, name="shimd-adoption", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        while True:
            try:
                self._watch_once()
            except Exception:  # the watch must outlive any one container's trouble
                log.exception("shim watch failed; going on")

    def _watch_once(self) -> None:
        records = {record["id"]: record for record in self.store.all() if self._watched(record)}
        for container_id in list(self._pidfds):
            if container_id not in records or records[container_id].get("shim_pid") != self._pidfds[container_id][0]:
                os.close(self._pidfds.pop(container_id)[1])
        poller = select.poll()
        by_fd: dict[int, str] = {}
        for container_id, record in records.items():
            if container_id not in self._pidfds:
                try:
                    self._pidfds[container_id] = (record["shim_pid"], os.pidfd_open(int(record["shim_pid"])))
                except ProcessLookupError:
                    self._settled[container_id] = record["shim_pid"]
                    self.adopt(record)
                    continue
            by_fd[self._pidfds[container_id][1]] = container_id
            poller.register(self._pidfds[container_id][1], select.POLLIN)
        for fd, _ in poller.poll(WATCH_INTERVAL_SECONDS * 1000):
            container_id = by_fd[fd]
            shim_pid, pidfd = self._pidfds.pop(container_id)
            os.close(pidfd)
            self._settled[container_id] = shim_pid
            record = self.store.find(container_id)
            if record is not None:
                self.adopt(record)
        for container_id in [key for key in self._settled if key not in records]:
            del self._settled[container_id]

    def _watched(self, record: dict[str, Any]) -> bool:
        return (record.get("phase") == PHASE_CREATED and bool(record.get("shim_pid")) and bool(record.get("shim_spec"))
                and self._settled.get(record["id"]) != record["shim_pid"])

    def adopt(self, record: dict[str, Any]) -> None:
        """Start a new shim for the container if its shim is gone and its init and keeper live."""
        lock = self.store.lock_for(record["id"])
        if not lock.acquire(timeout=0.5):
            return  # a stop or remove holds it; the next round looks again
        try:
            if self.store.shim_alive(record) or not self.store.init_alive(record) or self.store.exit_file(record["id"]).exists():
                return
            if not self.store.keeper_alive(record):
                log.warning("a container lost its shim and its keeper: nobody can take it over",
                            extra={"container_id": record["id"]})
                return
            spec = dict(record["shim_spec"], adopt=True, pid=record["pid"], keeper_pid=record["keeper_pid"])
            try:
                started = spawn_shim(spec, ADOPT_TIMEOUT_SECONDS)
            except PyrioError as exc:
                log.error("cannot re-adopt a container whose shim died", extra={"container_id": record["id"], "error": str(exc)})
                return
            record.update(shim_pid=started["shim_pid"], shim_start_time=process_start_time(started["shim_pid"]))
            self.store.save(record)
            log.warning("re-adopted a container whose shim died", extra={"container_id": record["id"], "shim_pid": started["shim_pid"]})
        finally:
            lock.release()
