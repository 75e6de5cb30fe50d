"""shimd: starts and finds the per-container shims, and owns container records.

shimd holds nothing in memory that the files do not: records are written
atomically, exits come from the shims' exit files, and running shims are
found again through their sockets, so a SIGKILLed shimd restarts into the
same view of every container.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.config import Config
from common.daemon import client_for
from common.errors import DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound
from common.rpc import RpcServer
from common.state import remove_stale_temp_files
from common.cgroups import CgroupManager, manager_for
from services.shimd.events import ContainerEvents
from services.shimd.records import PHASE_CREATED, PHASE_CREATING, PHASE_REMOVING, ContainerStore
from services.shimd.adoption import ShimAdoption
from services.shimd.shim_client import start_zygote
from services.shimd.container_exec import ContainerExec
from services.shimd.container_lifecycle import ContainerLifecycle
from services.shimd.container_recovery import ContainerRecovery
from services.shimd.container_status import ContainerStatus

log = logging.getLogger("pyrio.shimd")


class ShimDaemon(ContainerLifecycle, ContainerExec, ContainerStatus, ContainerRecovery):
    """shimd's RPC surface: the method table and wiring; the RPCs themselves
    live in the mixins, one module per concern."""

    def __init__(self, config: Config, cgroups: CgroupManager | None = None) -> None:
        self.config = config
        self.store = ContainerStore(config)
        self.cgroups = cgroups or manager_for(config.runtime.cgroup_manager)
        self.netd = client_for(config, "netd")
        self.imaged = client_for(config, "imaged")
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="shimd-bulk")
        # Pods whose StopPodSandbox/RemovePodSandbox began, by id -> when (unix
        # time); kept as files too, so a restarted shimd still refuses them.
        self._closing_dir = config.service_state_dir("shimd") / "closing"
        self._closing_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A shimd killed while marking a pod leaves the writer's temp file.
        remove_stale_temp_files(self._closing_dir)
        self._closing: dict[str, float] = {}
        for entry in self._closing_dir.iterdir():
            if entry.name.startswith("."):
                continue  # a write still in flight is no pod id
            try:
                self._closing[entry.name] = entry.stat().st_mtime
            except FileNotFoundError:
                pass
        self.events = ContainerEvents(config, self._sandbox_of, self._exited_ids, self.store.exit_file)
        self._recovery = threading.Thread(target=self._finish_interrupted, name="shimd-recover", daemon=True)
        self._recovery.start()
        self.adoption = ShimAdoption(self.store)
        self.adoption.start()

    # --- service ----------------------------------------------------------

    def health(self) -> dict[str, Any]:
        records = self.store.all()
        return {"ready": True, "reason": "", "containers": len(records)}

    def metrics(self) -> dict[str, Any]:
        """shimd's figures for crigw's /metrics (counters since this start)."""
        running = sum(1 for record in self.store.all()
                      if record.get("phase") == PHASE_CREATED and record.get("shim_pid") and self.store.shim_alive(record))
        return {"running_shims": running, "exits": dict(self.events.exits_by_class), "oom_kills": self.events.oom_kills}

    def close(self) -> None:
        self.events.close()
        self._pool.shutdown(wait=False)
        self.netd.close()
        self.imaged.close()

    def register(self, server: RpcServer) -> None:
        for verb in (
            "create", "start", "stop", "remove", "status", "list", "exec_sync", "reopen_log",
            "update_resources", "stats", "list_stats", "stop_all", "remove_all", "attach_info",
            "exec_info", "resize",
        ):
            server.register(f"container.{verb}", getattr(self, verb))
        server.register("sandbox.update_resources", self.update_sandbox_resources)
        server.register("sandbox.stats", self.sandbox_stats)
        server.register("container.statuses", self.statuses)

    def _sandbox_of(self, container_id: str) -> str:
        record = self.store.find(container_id)
        return record["sandbox_id"] if record and record.get("phase") == PHASE_CREATED else ""

    # --- helpers -------------------------------------------------------------

    @staticmethod
    def _container_id(params: dict[str, Any]) -> str:
        container_id = params.get("container_id", "")
        if not container_id:
            raise InvalidArgument("container_id must not be empty")
        return container_id

    def _record(self, params: dict[str, Any]) -> dict[str, Any]:
        container_id = self._container_id(params)
        record = self.store.get(container_id)
        if record.get("phase") == PHASE_CREATING:
            raise NotFound(f"container {container_id!r} not found (it is still being created)")
        if record.get("phase") == PHASE_REMOVING:
            raise NotFound(f"container {container_id!r} not found (it is being removed)")
        return record

    def _runtime(self, record: dict[str, Any], *args: str, timeout: float = 30.0, check: bool = True,
                 stdin: bytes | None = None) -> subprocess.CompletedProcess:
        command = [record["runtime_path"], "--root", record["runtime_root"], *record.get("runtime_flags", ()), *args]
        try:
            result = subprocess.run(command, input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeadlineExceeded(f"{' '.join(command[3:4])} of container {record['id'][:12]} took over {timeout:.0f}s") from None
        except OSError as exc:
            raise Internal(f"cannot run {command[0]}: {exc}") from None
        if check and result.returncode != 0:
            message = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise Internal(f"{os.path.basename(command[0])} {args[0]} failed: {message}")
        return result

    def _sandbox(self, sandbox_id: str) -> dict[str, Any]:
        return self.netd.call("sandbox.status", {"sandbox_id": sandbox_id}, idempotent=True)



def build(config: Config, server: RpcServer) -> ShimDaemon:
    try:
        cgroups = manager_for(config.runtime.cgroup_manager)
    except (FailedPrecondition, OSError) as exc:
        # As for a bad config: supervisord logs this at each retry, then marks shimd FATAL.
        print(f"pyrio-shimd: refusing to start: {exc}", file=sys.stderr)
        sys.exit(2)
    # Started now, so its warm-up is done before the first CreateContainer.
    start_zygote(str(config.service_state_dir("shimd")))
    daemon = ShimDaemon(config, cgroups)
    daemon.register(server)
    return daemon
