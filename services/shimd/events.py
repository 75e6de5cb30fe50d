"""shimd's container events: what GetContainerEvents streams, at the source.

shimd publishes CREATED, STARTED and DELETED as its calls succeed, and
STOPPED when a shim reports its container's exit: the shim, right after it
wrote the exit file, sends the container id as one datagram to
`<run_dir>/shimd/exits.sock` (the spec's `exit_notify_socket`). No polling
is involved in the normal path. Because a datagram can be lost (shimd down
or restarting at that instant, its queue full), a sweep every
SWEEP_SECONDS publishes STOPPED for any exit file not yet announced;
and an exit that happened while shimd was down is covered by the event
stream's epoch: its subscribers see shimd restart and relist.

Each event is {"kind": "container", "type": CREATED|STARTED|STOPPED|DELETED,
"container_id", "sandbox_id", "created_at": ns}; common/event_bus.py adds
epoch and seq.
"""

from __future__ import annotations

import _socket
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from common.config import Config
from common.event_bus import EventPublisher, events_endpoint

log = logging.getLogger("pyrio.shimd.events")

SWEEP_SECONDS = 5.0
MAX_DATAGRAM = 256


def exit_notify_socket(config: Config) -> str:
    return str(Path(config.pyrio.run_dir) / "shimd" / "exits.sock")


class StartWatch:
    succeeded = False


class ContainerEvents:
    """Publishes container events and listens for the shims' exit datagrams.

    `exited_ids()` lists the containers whose exit file exists, `exit_file_of`
    names one's exit file and `sandbox_of(container_id)` gives its pod ("" when
    shimd has no record): all come from shimd's store, so this module keeps no container state of its
    own beyond which exits it already announced.
    """

    def __init__(
        self,
        config: Config,
        sandbox_of: Callable[[str], str],
        exited_ids: Callable[[], list[str]],
        exit_file_of: Callable[[str], Path],
    ) -> None:
        self._exit_file_of = exit_file_of
        self.publisher = EventPublisher(events_endpoint(config, "shimd"))
        self._sandbox_of = sandbox_of
        self._exited_ids = exited_ids
        # Exits that happened before this start belong to the previous epoch.
        self._announced: set[str] = set(exited_ids())
        self._lock = threading.Lock()
        # Exits announced since this start, by code class, and OOM kills among them (metrics).
        self.exits_by_class: dict[str, int] = {}
        self.oom_kills = 0
        # Containers whose StartContainer is under way: an exit reported
        # meanwhile waits for STARTED, so the kubelet never sees them reversed.
        self._starting: set[str] = set()
        self.socket_path = exit_notify_socket(config)
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._socket = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        self._socket.bind(self.socket_path)
        self._stop = threading.Event()
        threading.Thread(target=self._listen, name="shimd-exits", daemon=True).start()
        threading.Thread(target=self._sweep, name="shimd-exit-sweep", daemon=True).start()

    def publish(self, event_type: str, container_id: str, sandbox_id: str) -> None:
        if event_type == "STOPPED":
            with self._lock:
                if container_id in self._announced:
                    return
                self._announced.add(container_id)
        elif event_type == "DELETED":
            with self._lock:
                self._announced.discard(container_id)
        if event_type == "STOPPED":
            self._count_exit(container_id)
        self.publisher.publish("container", {
            "type": event_type, "container_id": container_id, "sandbox_id": sandbox_id,
            "created_at": time.time_ns(),
        })

    @contextmanager
    def starting(self, container_id: str, sandbox_id: str) -> Iterator["StartWatch"]:
        """Around a start: STARTED once it succeeded, then STOPPED if the
        container already exited (its datagram was held back meanwhile)."""
        watch = StartWatch()
        with self._lock:
            self._starting.add(container_id)
        try:
            yield watch
        finally:
            with self._lock:
                self._starting.discard(container_id)
            if watch.succeeded:
                self.publish("STARTED", container_id, sandbox_id)
            if container_id in self._exited_ids_of([container_id]):
                self._stopped(container_id)

    def _count_exit(self, container_id: str) -> None:
        try:
            exit_record = json.loads(self._exit_file_of(container_id).read_bytes())
        except (OSError, ValueError):
            return
        code = int(exit_record.get("exit_code", 0))
        code_class = "zero" if code == 0 else "error" if code < 128 else "signal"
        with self._lock:
            self.exits_by_class[code_class] = self.exits_by_class.get(code_class, 0) + 1
            if exit_record.get("oom_killed"):
                self.oom_kills += 1

    def _stopped(self, container_id: str) -> None:
        with self._lock:
            if container_id in self._starting:
                return
        sandbox_id = self._sandbox_of(container_id)
        if sandbox_id:
            self.publish("STOPPED", container_id, sandbox_id)

    def _exited_ids_of(self, container_ids: list[str]) -> list[str]:
        return [container_id for container_id in container_ids if self._exit_file_of(container_id).exists()]

    def _listen(self) -> None:
        self._socket.settimeout(1.0)
        while not self._stop.is_set():
            try:
                data = self._socket.recv(MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            container_id = data.decode("ascii", "replace").strip()
            if container_id:
                try:
                    self._stopped(container_id)
                except Exception:
                    log.exception("cannot announce an exit", extra={"container_id": container_id})

    def _sweep(self) -> None:
        while not self._stop.wait(SWEEP_SECONDS):
            try:
                for container_id in self._exited_ids():
                    if container_id not in self._announced:
                        self._stopped(container_id)
            except Exception:
                log.exception("exit sweep failed")

    def close(self) -> None:
        self._stop.set()
        self.publisher.close()
        self._socket.close()
