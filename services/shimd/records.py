"""Container records and the files around them.

Layout, per container:
  <state_dir>/shimd/containers/<id>/record.json   shimd's record (atomic)
  <state_dir>/shimd/containers/<id>/exit.json     written by the shim when the container exits
  <state_dir>/shimd/containers/<id>/bundle/config.json
  <state_dir>/shimd/containers/<id>/{runtime.log,shim.log,termination-log}
  <run_dir>/shims/<id[:20]>.ctl / .attach         the shim's sockets (short: sun_path is 108 bytes)

The exit file is the truth about an exit: the shim writes it the moment the
container's init is reaped, whichever services are up at the time.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import NotFound, PyrioError
from common.ids import resolve_id
from common.state import atomic_write_json, read_json, remove_stale_temp_files
from services.shimd.liveness import InitWatch
from services.shimd.shim_io import keeper_exit_status
from services.shimd.request_files import read_regular_file

CREATED, RUNNING, EXITED, UNKNOWN = 0, 1, 2, 3  # CRI ContainerState
STATE_NAMES = {CREATED: "CONTAINER_CREATED", RUNNING: "CONTAINER_RUNNING", EXITED: "CONTAINER_EXITED", UNKNOWN: "CONTAINER_UNKNOWN"}

# Lifecycle phases of a record (not the CRI state, which is derived).
PHASE_CREATING = "creating"
PHASE_CREATED = "created"
PHASE_REMOVING = "removing"

# The kubelet reads at most 4 KiB of a termination message per container.
MAX_TERMINATION_MESSAGE = 4096


_boot_id: str | None = None


def current_boot_id() -> str:
    """The kernel's id of this boot: a record made under another one outlived a reboot."""
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as handle:
                _boot_id = handle.read().strip()
        except OSError:
            _boot_id = ""
    return _boot_id


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (0 when gone): tells a live PID from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    if fields[0] in ("Z", "X"):
        return 0
    return int(fields[19])


class ContainerStore:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.service_state_dir("shimd") / "containers"
        self.sockets = Path(config.pyrio.run_dir) / "shims"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sockets.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._id_locks: dict[str, threading.RLock] = {}
        self.inits = InitWatch()
        for directory in self.root.iterdir():
            if not directory.is_dir():
                continue
            remove_stale_temp_files(directory)
            try:
                record = read_json(directory / "record.json")
            except ValueError:
                record = None  # the atomic writer never leaves one torn; be safe anyway
            if isinstance(record, dict) and record.get("id") == directory.name:
                self._records[directory.name] = record
            else:
                # The record is written before anything else of a container
                # and removed with its directory: a directory without one is
                # what a removal killed mid-rmtree left.
                shutil.rmtree(directory, ignore_errors=True)

    # --- paths ------------------------------------------------------------

    def directory(self, container_id: str) -> Path:
        return self.root / container_id

    def exit_file(self, container_id: str) -> Path:
        return self.directory(container_id) / "exit.json"

    def reaped_file(self, container_id: str) -> Path:
        """The keeper's records of the processes it reaped (services/shimd/keeper.py)."""
        return self.directory(container_id) / "reaped"

    def control_socket(self, container_id: str) -> str:
        return str(self.sockets / f"{container_id[:20]}.ctl")

    def attach_socket(self, container_id: str) -> str:
        return str(self.sockets / f"{container_id[:20]}.attach")

    # --- records ----------------------------------------------------------

    def lock_for(self, container_id: str) -> threading.RLock:
        with self._lock:
            return self._id_locks.setdefault(container_id, threading.RLock())

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def save(self, record: dict[str, Any]) -> None:
        with self._lock:
            directory = self.directory(record["id"])
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_json(directory / "record.json", record)
            self._records[record["id"]] = record

    def get(self, container_id: str) -> dict[str, Any]:
        """The record of a container given by id or unique prefix (NotFound otherwise)."""
        with self._lock:
            full_id = resolve_id(container_id, list(self._records), "container")
            return self._records[full_id]

    def find(self, container_id: str) -> dict[str, Any] | None:
        try:
            return self.get(container_id)
        except NotFound:
            return None

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records.values())

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._records)

    def delete(self, container_id: str) -> None:
        with self._lock:
            self._records.pop(container_id, None)
            self._id_locks.pop(container_id, None)
        self.inits.forget(container_id)
        for path in (self.control_socket(container_id), self.attach_socket(container_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.directory(container_id), ignore_errors=True)

    # --- exit and state -----------------------------------------------------

    def read_exit(self, container_id: str) -> dict[str, Any] | None:
        return read_json(self.exit_file(container_id))

    def record_lost_exit(self, record: dict[str, Any], reason: str) -> dict[str, Any]:
        """The shim died before the container: the exit code is unknowable."""
        exit_record = {"exit_code": 255, "exited_at": time.time_ns(), "oom_killed": False, "pid": record.get("pid", 0), "lost": reason}
        atomic_write_json(self.exit_file(record["id"]), exit_record)
        return exit_record

    def init_alive(self, record: dict[str, Any]) -> bool:
        pid = int(record.get("pid") or 0)
        return bool(pid) and process_start_time(pid) == record.get("pid_start_time")

    def keeper_alive(self, record: dict[str, Any]) -> bool:
        pid = int(record.get("keeper_pid") or 0)
        return bool(pid) and process_start_time(pid) == record.get("keeper_start_time")

    def keeper_exit(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The init's exit as its keeper recorded it (written down as the exit
        file), when the shim died before it could write that itself."""
        status = keeper_exit_status(str(self.reaped_file(record["id"])), int(record.get("pid") or 0))
        if status is None:
            return None
        exit_code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        exit_record = {"exit_code": exit_code, "exited_at": time.time_ns(), "oom_killed": False,
                       "pid": record.get("pid", 0)}
        atomic_write_json(self.exit_file(record["id"]), exit_record)
        return exit_record

    def shim_alive(self, record: dict[str, Any]) -> bool:
        pid = int(record.get("shim_pid") or 0)
        started = process_start_time(pid) if pid else 0
        # A reused pid is no shim (records before shim_start_time compare nothing).
        return bool(started) and started == record.get("shim_start_time", started) and os.path.exists(self.control_socket(record["id"]))

    def state(self, record: dict[str, Any], alive_ids: set[str] | None = None) -> tuple[int, dict[str, Any] | None]:
        """(CRI state, exit record) derived from the files and the live processes.

        `alive_ids` is `self.inits.alive_ids()` taken once for a whole listing."""
        if record.get("phase") == PHASE_CREATING:
            return UNKNOWN, None
        container_id = record["id"]
        # An init and its shim held by pidfds, neither exited: no exit file can exist yet.
        if container_id in alive_ids if alive_ids is not None else self.inits.alive(container_id):
            return (RUNNING if record.get("started_at") else CREATED), None
        exit_record = self.inits.exit_record(container_id) or self.read_exit(container_id)
        if exit_record is not None:
            self.inits.remember_exit(container_id, exit_record)
            return EXITED, exit_record
        if self.shim_alive(record) or (self.init_alive(record) and self.keeper_alive(record)):
            # Without a shim the keeper still holds the container's output and
            # will record its exit; a new shim is on its way (adoption.py).
            if self.init_alive(record) and self.shim_alive(record):
                self.inits.watch(container_id, [int(record["pid"]), int(record["shim_pid"])],
                                 lambda: self.init_alive(record) and self.shim_alive(record))
            return (RUNNING if record.get("started_at") else CREATED), None
        if self.init_alive(record):
            return UNKNOWN, None  # nobody supervises it: its exit could not be known
        rebooted = bool(record.get("boot_id")) and record["boot_id"] != current_boot_id()
        exit_record = None if rebooted else self.keeper_exit(record)
        if exit_record is not None:
            return EXITED, exit_record
        # Both gone and no exit file: the shim was killed, then the container
        # ended. Re-read first: the shim may have written it just now.
        exit_record = self.read_exit(record["id"])
        if exit_record is None:
            if record.get("boot_id") and record["boot_id"] != current_boot_id():
                reason = "the node rebooted while the container existed: its exit code is unknown"
            else:
                reason = "the shim exited before recording the container's exit"
            exit_record = self.record_lost_exit(record, reason)
        self.inits.remember_exit(container_id, exit_record)
        return EXITED, exit_record

    def termination_message(self, record: dict[str, Any]) -> str:
        source = record.get("termination_message_file")
        if not source:
            return ""
        try:
            # The kubelet's own mount may name a FIFO or a device: never block or over-read.
            data = read_regular_file(source, MAX_TERMINATION_MESSAGE, "termination message file", truncate=True)
        except PyrioError:
            return ""
        return data.decode(errors="replace")
