"""shimd: starts and finds the per-container shims, and owns container records.

shimd holds nothing in memory that the files do not: records are written
atomically, exits come from the shims' exit files, and running shims are
found again through their sockets, so a SIGKILLed shimd restarts into the
same view of every container.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.config import Config
from common.daemon import client_for
from common.exec_limits import MAX_EXEC_TIMEOUT_SECONDS, MAX_STOP_TIMEOUT_SECONDS, check_exec_command, clamp_timeout
from common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PyrioError,
    Unavailable,
)
from common.ids import new_id
from common.rpc import CallContext, RpcServer
from common.state import atomic_write_bytes, atomic_write_json, remove_file
from common.cgroups import CgroupManager, manager_for
from common.cgroups.parent_check import check_cgroup_parent
from services.shimd.events import ContainerEvents
from services.shimd import cgroup_leftovers, network_stats, oci_spec, pod_resources, spec_mounts, spec_resources, spec_validation
from services.shimd.records import (
    CREATED,
    EXITED,
    PHASE_CREATED,
    PHASE_CREATING,
    PHASE_REMOVING,
    RUNNING,
    ContainerStore,
    current_boot_id,
    process_start_time,
)
from services.shimd import spec_userns, userns_staging
from services.shimd.adoption import ShimAdoption
from services.shimd.shim_client import shim_request, spawn_shim, start_zygote

log = logging.getLogger("pyrio.shimd")

# CRI's Signal enum, by number (cri_api.v1 Signal); 0 is RUNTIME_DEFAULT.
CRI_SIGNALS = [
    "", "SIGABRT", "SIGALRM", "SIGBUS", "SIGCHLD", "SIGCLD", "SIGCONT", "SIGFPE", "SIGHUP", "SIGILL", "SIGINT",
    "SIGIO", "SIGIOT", "SIGKILL", "SIGPIPE", "SIGPOLL", "SIGPROF", "SIGPWR", "SIGQUIT", "SIGSEGV", "SIGSTKFLT",
    "SIGSTOP", "SIGSYS", "SIGTERM", "SIGTRAP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGURG", "SIGUSR1", "SIGUSR2",
    "SIGVTALRM", "SIGWINCH", "SIGXCPU", "SIGXFSZ",
]
SANDBOX_READY_STATES = (0, "SANDBOX_READY", "READY", "ready")
# Per stream: the kubelet's gRPC client takes at most 16 MiB per message,
# and both streams travel in one.
EXEC_OUTPUT_LIMIT = 6 * 1024 * 1024
# A stop waits the grace period, SIGKILL, then at most this long for the exit.
STOP_MARGIN_SECONDS = 15.0
SHIM_REQUEST_TIMEOUT = 10.0
# How long shimd itself remembers that a pod was stopped or removed.
CLOSING_MEMORY_SECONDS = 3600.0


def signal_number(name: str | int | None) -> int:
    """A signal from a CRI enum number, a name (SIGTERM, TERM) or a number string."""
    if name in (None, "", 0):
        return int(signal.SIGTERM)
    if isinstance(name, int):
        if 0 < name < len(CRI_SIGNALS):
            return int(getattr(signal, CRI_SIGNALS[name].replace("SIGCLD", "SIGCHLD").replace("SIGPOLL", "SIGIO")))
        raise InvalidArgument(f"unknown stop signal {name}")
    text = str(name).strip().upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(getattr(signal, text))
    except AttributeError:
        raise InvalidArgument(f"unknown stop signal {name!r}") from None


def cri_signal(number: int) -> int:
    """The CRI Signal enum value of a signal number (0, RUNTIME_DEFAULT, if it has none)."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return 0
    return CRI_SIGNALS.index(name) if name in CRI_SIGNALS else 0


def reported_image(record: dict[str, Any]) -> dict[str, Any]:
    """The ImageSpec ContainerStatus and ListContainers report.

    Its `image` is what the kubelet asked for (`user_specified_image`), or
    the image's tag, never the `sha256:` id the kubelet resolved it to, as
    containerd does: `kubectl get pod` shows it. `image_ref` and `image_id`
    carry the digest and the id.
    """
    spec = dict(record["image"])
    named = spec.get("user_specified_image") or record.get("image_name")
    if named:
        spec["image"] = named
    return spec


class ShimDaemon:
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
        self._closing: dict[str, float] = {}
        for entry in self._closing_dir.iterdir():
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

    def _exited_ids(self) -> list[str]:
        return [record["id"] for record in self.store.all()
                if record.get("phase") == PHASE_CREATED and self.store.exit_file(record["id"]).exists()]

    def _finish_interrupted(self) -> None:
        """Records left half-made or half-removed by a shimd that was killed."""
        for record in self.store.all():
            if record.get("phase") == PHASE_CREATED and not record.get("started_at"):
                try:
                    self._adopt_start(record)
                except PyrioError as exc:
                    log.warning("cannot ask the runtime about a created container", extra={"container_id": record["id"], "error": str(exc)})
            if record.get("phase") in (PHASE_CREATING, PHASE_REMOVING):
                self._destroy_with_retries(record)

    def _destroy_with_retries(self, record: dict[str, Any]) -> None:
        """Finish removing a container whose removal failed or was interrupted
        (imaged down, say). Its record is no longer listed, so nobody else
        would ever retry: keep at it here."""
        for attempt in range(60):
            try:
                with self.store.lock_for(record["id"]):
                    if self.store.find(record["id"]) is None:
                        return
                    self._destroy(record)
                log.info("finished an interrupted create/remove", extra={"container_id": record["id"]})
                return
            except PyrioError as exc:
                log.info("retrying interrupted clean-up", extra={"container_id": record["id"], "error": str(exc)})
                time.sleep(min(5.0, 0.5 * (attempt + 1)))
        log.error("giving up cleaning up a container until shimd restarts", extra={"container_id": record["id"]})

    def _destroy_later(self, record: dict[str, Any]) -> None:
        threading.Thread(target=self._destroy_with_retries, args=(record,), name="shimd-cleanup", daemon=True).start()

    def _adopt_start(self, record: dict[str, Any]) -> None:
        """A shimd killed between `runtime start` and saving the record left a
        running container recorded as created: the runtime knows better."""
        with self.store.lock_for(record["id"]):
            if record.get("started_at") or not self.store.init_alive(record):
                return
            if self._runtime_status(record) == "running":
                record["started_at"] = time.time_ns()
                self.store.save(record)
                log.info("found a started container recorded as created", extra={"container_id": record["id"]})

    # --- helpers -------------------------------------------------------------

    def _record(self, params: dict[str, Any]) -> dict[str, Any]:
        container_id = params.get("container_id", "")
        if not container_id:
            raise InvalidArgument("container_id must not be empty")
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

    # --- create ------------------------------------------------------------------

    def create(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        sandbox_id = params.get("sandbox_id", "")
        config = params.get("config") or {}
        sandbox_config = params.get("sandbox_config") or {}
        metadata = config.get("metadata") or {}
        name = metadata.get("name", "")
        image = (config.get("image") or {}).get("image", "")
        if not sandbox_id:
            raise InvalidArgument("pod_sandbox_id must not be empty")
        if not name:
            raise InvalidArgument("container config must have metadata.name")
        if not image:
            raise InvalidArgument("container config must name an image (image.image)")
        if config.get("stdin_once") and not config.get("stdin"):
            raise InvalidArgument("stdin_once needs stdin")
        spec_validation.validate_container_config(config)
        sandbox = self._sandbox(sandbox_id)
        if sandbox.get("state") not in SANDBOX_READY_STATES:
            raise FailedPrecondition(f"pod sandbox {sandbox['id'][:12]} is not ready: cannot create containers in it")
        check_cgroup_parent(spec_resources.pod_cgroup_parent(self.config, sandbox), self.cgroups,
                            self.config.runtime.cgroup_parent_root)
        handler_name = sandbox.get("runtime_handler") or ""
        handler = self.config.runtime_handler(handler_name)
        attempt = int(metadata.get("attempt", 0))
        container_id = new_id()
        log_directory = sandbox.get("log_directory") or sandbox_config.get("log_directory") or ""
        log_path = ""
        if config.get("log_path"):
            if not log_directory:
                raise InvalidArgument("log_path is set but the pod sandbox has no log_directory")
            log_path = os.path.normpath(os.path.join(log_directory, config["log_path"]))
            spec_validation.validate_log_path(log_path)
        record: dict[str, Any] = {
            "id": container_id,
            "sandbox_id": sandbox["id"],
            "name": name,
            "attempt": attempt,
            "metadata": metadata,
            "image": config.get("image") or {},
            "labels": config.get("labels") or {},
            "annotations": config.get("annotations") or {},
            "config": config,
            "created_at": time.time_ns(),
            "started_at": 0,
            "log_path": log_path,
            "runtime_handler": handler_name or self.config.runtime.default_runtime,
            "runtime_path": handler.path,
            "runtime_root": handler.root,
            # runc and crun make the container's scope themselves (over D-Bus) with this flag.
            "runtime_flags": ["--systemd-cgroup"] if self.cgroups.systemd else [],
            "tty": bool(config.get("tty")),
            "stdin": bool(config.get("stdin")),
            "stdin_once": bool(config.get("stdin_once")),
            "phase": PHASE_CREATING,
            "boot_id": current_boot_id(),
        }
        # The record is saved and its lock taken under the store lock, so a
        # StopPodSandbox/RemovePodSandbox of the pod either refuses this create
        # (the pod is closing) or sees the record and waits for the create.
        container_lock = self.store.lock_for(container_id)
        with self.store.lock:
            self._check_open(sandbox["id"])
            for other in self.store.all():
                if (other["sandbox_id"] == sandbox["id"] and other["name"] == name and other["attempt"] == attempt
                        and other.get("phase") != PHASE_REMOVING):
                    raise AlreadyExists(
                        f"container name {name!r} (attempt {attempt}) is already in use in pod "
                        f"{sandbox['id'][:12]} by container {other['id']}; remove it or use another attempt"
                    )
            self.store.save(record)
            container_lock.acquire()
        try:
            self._create(record, sandbox, sandbox_config, call)
        except BaseException:
            try:
                self._destroy(record)
            except PyrioError as cleanup_error:
                log.warning("clean-up of a failed create is retried in the background",
                            extra={"container_id": container_id, "error": str(cleanup_error)})
                self._destroy_later(record)
            raise
        finally:
            container_lock.release()
        log.info("container created", extra={"container_id": container_id, "sandbox_id": sandbox["id"], "container_name": name})
        self.events.publish("CREATED", container_id, sandbox["id"])
        return {"container_id": container_id}

    def _create(self, record: dict[str, Any], sandbox: dict[str, Any], sandbox_config: dict[str, Any], call: CallContext) -> None:
        container_id = record["id"]
        config = record["config"]
        prepared = self.imaged.call(
            "rootfs.prepare",
            {"container_id": container_id, "image": record["image"].get("image", ""),
             "image_volumes": spec_mounts.image_volume_images(config),
             **spec_userns.rootfs_idmap(sandbox)},
            timeout=max(call.remaining(), 5.0),
        )
        record.update(
            rootfs=prepared["rootfs"],
            image_ref=prepared.get("image_id", ""),
            image_name=prepared.get("image_name", ""),
            repo_digest=prepared.get("repo_digest", ""),
        )
        image_config = prepared.get("config") or {}
        container_dir = self.store.directory(container_id)
        spec = oci_spec.build_spec(
            self.config,
            oci_spec.SpecInputs(
                container_id=container_id,
                config=config,
                sandbox=sandbox,
                sandbox_config=sandbox_config,
                image_config=image_config,
                rootfs=prepared["rootfs"],
                container_dir=container_dir,
                image_name=prepared.get("image_name", ""),
                image_volumes=prepared.get("image_volumes") or [],
            ),
            self.cgroups,
        )
        if sandbox.get("userns"):
            userns_staging.stage(self.config.pyrio.run_dir, container_id, spec, sandbox["userns"])
        cgroups_path = spec["linux"]["cgroupsPath"]
        if not self.cgroups.systemd:
            # Noted before runc runs: a create that fails removes the parents it made.
            record["cgroup_parents_made"] = cgroup_leftovers.missing_parents(self.cgroups.cgroup_of(cgroups_path))
        stop_signal = config.get("stop_signal") or image_config.get("StopSignal") or ""
        termination = spec_mounts.termination_message_source(config, container_dir)
        record.update(
            cgroups_path=cgroups_path,
            stop_signal=signal_number(stop_signal),
            resources=(config.get("linux") or {}).get("resources") or {},
            mounts=config.get("mounts") or [],
            termination_message_file=str(termination) if termination else "",
            user={"uid": spec["process"]["user"]["uid"], "gid": spec["process"]["user"]["gid"],
                  "supplemental_groups": spec["process"]["user"].get("additionalGids", [])},
        )
        bundle = container_dir / "bundle"
        bundle.mkdir(parents=True, exist_ok=True)
        atomic_write_json(bundle / "config.json", spec)
        if record["log_path"]:
            Path(record["log_path"]).parent.mkdir(parents=True, exist_ok=True)
        self.store.save(record)
        Path(record["runtime_root"]).mkdir(parents=True, exist_ok=True, mode=0o700)
        shim_spec = {
            "container_id": container_id,
            "runtime_path": record["runtime_path"],
            "runtime_root": record["runtime_root"],
            "runtime_flags": record.get("runtime_flags", []),
            "bundle": str(bundle),
            "pid_file": str(container_dir / "init.pid"),
            "runtime_log": str(container_dir / "runtime.log"),
            "shim_log": str(container_dir / "shim.log"),
            "log_path": record["log_path"],
            "exit_file": str(self.store.exit_file(container_id)),
            "reaped_file": str(self.store.reaped_file(container_id)),
            "control_socket": self.store.control_socket(container_id),
            "attach_socket": self.store.attach_socket(container_id),
            "tty": record["tty"],
            "stdin": record["stdin"],
            "stdin_once": record["stdin_once"],
            "create_timeout": self.config.runtime.create_timeout,
            "oom_files": self.cgroups.oom_files(cgroups_path),
            "exit_notify_socket": self.events.socket_path,
        }
        started = spawn_shim(shim_spec, self.config.runtime.create_timeout + 5.0)
        record.update(
            shim_spec=shim_spec,  # what a new shim needs to re-adopt the container (adoption.py)
            keeper_pid=started["keeper_pid"],
            keeper_start_time=process_start_time(started["keeper_pid"]),
            shim_pid=started["shim_pid"],
            shim_start_time=process_start_time(started["shim_pid"]),
            pid=started["pid"],
            pid_start_time=process_start_time(started["pid"]),
        )
        if self.cgroups.systemd:
            # Out of shimd's cgroup (the pyrio service's, which a stop of the
            # service kills) into a scope of its own in the pod's slice, as CRI-O
            # does with crio-conmon-<id>.scope.
            record["shim_cgroup"] = self.cgroups.apply(
                started["shim_pid"], spec_resources.pod_cgroup_parent(self.config, sandbox),
                f"pyrio-shim-{container_id}", f"pyrio shim of container {container_id}",
            )
        record["phase"] = PHASE_CREATED
        self.store.save(record)

    def _destroy(self, record: dict[str, Any]) -> None:
        """Remove everything a container has (idempotent; each step may already be done)."""
        container_id = record["id"]
        failed_create = record.get("phase") == PHASE_CREATING
        if record.get("phase") != PHASE_REMOVING:
            record["phase"] = PHASE_REMOVING
            self.store.save(record)
        if record.get("shim_pid") and self.store.shim_alive(record):
            try:
                shim_request(self.store.control_socket(container_id), {"op": "kill", "signal": int(signal.SIGKILL)}, 5.0)
            except PyrioError:
                pass
        if record.get("runtime_path"):
            self._runtime(record, "delete", "--force", container_id, check=False)
        if record.get("cgroups_path") and not self.cgroups.systemd:
            # A create that failed before runc recorded the container left
            # cgroups `runc delete` does not know about.
            cgroup_leftovers.remove_leftovers(self.cgroups.cgroup_of(record["cgroups_path"]),
                                              record.get("cgroup_parents_made", []) if failed_create else [])
        try:
            userns_staging.unstage(self.config.pyrio.run_dir, container_id)
        except OSError as exc:
            raise Internal(f"cannot remove the staged mounts of container {container_id}: {exc}") from None
        try:
            self.imaged.call("rootfs.remove", {"container_id": container_id}, idempotent=True)
        except NotFound:
            pass
        self.store.delete(container_id)

    # --- start / stop / remove ------------------------------------------------------

    def start(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._record(params)
        with self.store.lock_for(record["id"]):
            state, _ = self.store.state(record)
            if state != CREATED:
                raise FailedPrecondition(
                    f"container {record['id'][:12]} is {self._state_word(state)}: only a created container can be started"
                )
            # Taken before the start: a container that exits at once must not
            # report a finish before its start.
            started_at = time.time_ns()
            with self.events.starting(record["id"], record["sandbox_id"]) as start:
                try:
                    self._runtime(record, "start", record["id"])
                except Internal:
                    # A shimd killed after `runtime start` but before saving the
                    # record left the container started: the start happened.
                    if self._runtime_status(record) not in ("running", "stopped"):
                        raise
                    log.info("container was already started", extra={"container_id": record["id"]})
                record["started_at"] = started_at
                self.store.save(record)
                start.succeeded = True
        return {}

    def _runtime_status(self, record: dict[str, Any]) -> str:
        """The runtime's word for the container ("created", "running", "stopped"), "" if unknown."""
        result = self._runtime(record, "state", record["id"], check=False)
        try:
            return str(json.loads(result.stdout).get("status", "")) if result.returncode == 0 else ""
        except ValueError:
            return ""

    @staticmethod
    def _state_word(state: int) -> str:
        return {CREATED: "created", RUNNING: "running", EXITED: "exited"}.get(state, "in an unknown state")

    def stop(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        container_id = params.get("container_id", "")
        if not container_id:
            raise InvalidArgument("container_id must not be empty")
        record = self.store.find(container_id)
        if record is None:
            return {}  # StopContainer is idempotent, as RemoveContainer (CRI-O and containerd agree)
        self._stop(record, clamp_timeout(float(params.get("timeout") or 0), MAX_STOP_TIMEOUT_SECONDS, "stop timeout"))
        return {}

    def _stop(self, record: dict[str, Any], timeout: float) -> None:
        with self.store.lock_for(record["id"]):
            state, _ = self.store.state(record)
            if state == EXITED or record.get("phase") != PHASE_CREATED:
                return
            request = {"op": "stop", "signal": record.get("stop_signal", int(signal.SIGTERM)), "timeout": timeout}
            try:
                shim_request(self.store.control_socket(record["id"]), request, timeout + STOP_MARGIN_SECONDS)
                return
            except Unavailable:
                pass
            # No shim (killed), yet the container lives: signal it ourselves.
            if self.store.init_alive(record):
                self._stop_without_shim(record, timeout)
            self.store.state(record)  # records the exit the shim could not

    def _stop_without_shim(self, record: dict[str, Any], timeout: float) -> None:
        pid = int(record["pid"])
        signals = [(record.get("stop_signal", int(signal.SIGTERM)), timeout)] if timeout > 0 else []
        signals.append((int(signal.SIGKILL), STOP_MARGIN_SECONDS))
        for signum, wait in signals:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not self.store.init_alive(record):
                    return
                time.sleep(0.05)

    def remove(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        container_id = params.get("container_id", "")
        if not container_id:
            raise InvalidArgument("container_id must not be empty")
        record = self.store.find(container_id)
        if record is None:
            return {}  # RemoveContainer is idempotent
        self._remove(record)
        return {}

    def _remove(self, record: dict[str, Any]) -> None:
        if record.get("phase") == PHASE_CREATED:
            self._stop(record, 0)
        with self.store.lock_for(record["id"]):
            if self.store.find(record["id"]) is None:
                return
            try:
                self._destroy(record)
            except PyrioError:
                # The record is now `removing` and unlisted: the kubelet will
                # not ask again, so the removal goes on in the background.
                self._destroy_later(record)
                raise
        log.info("container removed", extra={"container_id": record["id"]})
        self.events.publish("DELETED", record["id"], record["sandbox_id"])

    def _check_open(self, sandbox_id: str) -> None:
        """Refuse a create in a pod whose stop or removal has begun (call with the store lock)."""
        if sandbox_id in self._closing:
            raise FailedPrecondition(
                f"pod sandbox {sandbox_id[:12]} is being stopped or removed: cannot create containers in it"
            )

    def _close(self, sandbox_id: str) -> list[dict[str, Any]]:
        """Mark a pod closing and return its containers, those being created included."""
        if not sandbox_id:
            raise InvalidArgument("sandbox_id must not be empty")
        with self.store.lock:
            now = time.time()
            # A pod stopped long ago is known to netd as not ready (or gone),
            # which refuses creates just as well: forget it here.
            for stale in [key for key, at in self._closing.items() if now - at > CLOSING_MEMORY_SECONDS]:
                del self._closing[stale]
                remove_file(self._closing_dir / stale)
            if sandbox_id not in self._closing and all(char in "0123456789abcdef" for char in sandbox_id):
                atomic_write_bytes(self._closing_dir / sandbox_id, b"")
            self._closing[sandbox_id] = now
            return [record for record in self.store.all() if record["sandbox_id"] == sandbox_id]

    def stop_all(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        records = self._close(params.get("sandbox_id", ""))
        timeout = clamp_timeout(float(params.get("timeout") or 0), MAX_STOP_TIMEOUT_SECONDS, "stop timeout")
        self._each(records, lambda record: self._stop(record, timeout))
        return {"stopped": [record["id"] for record in records]}

    def remove_all(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        records = self._close(params.get("sandbox_id", ""))
        self._each(records, self._remove)
        return {"removed": [record["id"] for record in records]}

    def _each(self, records: list[dict[str, Any]], action: Any) -> None:
        errors = []
        for future in [self._pool.submit(action, record) for record in records]:
            try:
                future.result()
            except PyrioError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # --- status / list ----------------------------------------------------------------

    def _status(self, record: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
        state, exit_record = self.store.state(record)
        status: dict[str, Any] = {
            "id": record["id"],
            "pod_sandbox_id": record["sandbox_id"],
            "metadata": record["metadata"],
            "state": state,
            "created_at": record["created_at"],
            "started_at": record.get("started_at", 0),
            "finished_at": 0,
            "exit_code": 0,
            "image": reported_image(record),
            "image_ref": record.get("repo_digest") or record.get("image_ref", ""),
            "image_id": record.get("image_ref", ""),
            "reason": "",
            "message": "",
            "labels": record["labels"],
            "annotations": record["annotations"],
            "mounts": record.get("mounts", []),
            "log_path": record.get("log_path", ""),
            "resources": {"linux": record.get("resources", {})},
            "user": {"linux": record.get("user", {})},
            "stop_signal": cri_signal(record.get("stop_signal", int(signal.SIGTERM))),
        }
        if exit_record is not None:
            status["finished_at"] = exit_record["exited_at"]
            status["exit_code"] = exit_record["exit_code"]
            if exit_record.get("oom_killed"):
                status["reason"] = "OOMKilled"
            elif exit_record["exit_code"] == 0:
                status["reason"] = "Completed"
            else:
                status["reason"] = "Error"
            status["message"] = self.store.termination_message(record) or exit_record.get("lost", "")
        if verbose:
            info = {
                "pid": record.get("pid", 0) if state in (CREATED, RUNNING) else 0,
                "shim_pid": record.get("shim_pid", 0),
                "keeper_pid": record.get("keeper_pid", 0),
                "sandbox_id": record["sandbox_id"],
                "runtime_handler": record.get("runtime_handler", ""),
                "runtime_spec": self._spec(record),
                "cgroups_path": record.get("cgroups_path", ""),
            }
            status["info"] = {"info": json.dumps(info, sort_keys=True)}
        return status

    def _spec(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            return json.loads((self.store.directory(record["id"]) / "bundle" / "config.json").read_text())
        except (OSError, ValueError):
            return {}

    def status(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._record(params)
        return self._status(record, bool(params.get("verbose")))

    def statuses(self, params: dict[str, Any], call: CallContext) -> list[dict[str, Any]]:
        """The ContainerStatus of every container of one pod (events, PodSandboxStatus)."""
        sandbox_id = params.get("sandbox_id", "")
        if not sandbox_id:
            raise InvalidArgument("sandbox_id must not be empty")
        return [self._status(record) for record in self.store.all()
                if record["sandbox_id"] == sandbox_id and record.get("phase") == PHASE_CREATED]

    def list(self, params: dict[str, Any], call: CallContext) -> list[Any]:
        """Listed containers matching the filter; with `brief`, only [id, state]
        pairs (a listed container's other fields never change: crigw caches them)."""
        wanted = params.get("filter") or {}
        brief = bool(params.get("brief"))
        wanted_state = int((wanted.get("state") or {}).get("state", 0)) if wanted.get("state") is not None else None
        alive = self.store.inits.alive_ids()
        result: list[Any] = []
        for record in self._filtered(wanted):
            state, _ = self.store.state(record, alive)
            if wanted_state is not None and state != wanted_state:
                continue
            if brief:
                result.append([record["id"], state])
                continue
            result.append({
                "id": record["id"],
                "pod_sandbox_id": record["sandbox_id"],
                "metadata": record["metadata"],
                "image": reported_image(record),
                "image_ref": record.get("repo_digest") or record.get("image_ref", ""),
                "image_id": record.get("image_ref", ""),
                "state": state,
                "created_at": record["created_at"],
                "labels": record["labels"],
                "annotations": record["annotations"],
            })
        return result

    def _filtered(self, wanted: dict[str, Any]) -> list[dict[str, Any]]:
        records = [record for record in self.store.all() if record.get("phase") == PHASE_CREATED]
        if wanted.get("ids") is not None:
            ids = set(wanted["ids"])
            records = [record for record in records if record["id"] in ids]
        if wanted.get("id"):
            records = [record for record in records if record["id"].startswith(wanted["id"])]
        if wanted.get("pod_sandbox_id"):
            records = [record for record in records if record["sandbox_id"].startswith(wanted["pod_sandbox_id"])]
        selector = wanted.get("label_selector") or {}
        if selector:
            records = [record for record in records
                       if all(record["labels"].get(key) == value for key, value in selector.items())]
        return records

    # --- exec, logs, attach -------------------------------------------------------------

    def _running(self, params: dict[str, Any], action: str) -> dict[str, Any]:
        record = self._record(params)
        state, _ = self.store.state(record)
        if state != RUNNING:
            raise FailedPrecondition(
                f"cannot {action} container {record['id'][:12]}: it is {self._state_word(state)}, not running"
            )
        return record

    def exec_sync(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        # Checked before anything reaches the shim, which must never be
        # handed a request it cannot take (common/exec_limits.py).
        command = check_exec_command(list(params.get("cmd") or []))
        timeout = clamp_timeout(float(params.get("timeout") or 0), MAX_EXEC_TIMEOUT_SECONDS, "exec timeout")
        record = self._running(params, "exec in")
        pid_file = str(self.store.directory(record["id"]) / f"exec-{new_id()[:16]}.pid")
        request = {"op": "exec", "cmd": command, "timeout": timeout, "pid_file": pid_file, "max_output": EXEC_OUTPUT_LIMIT}
        wait = (timeout + STOP_MARGIN_SECONDS) if timeout > 0 else max(call.remaining(), 1.0)
        try:
            reply = shim_request(self.store.control_socket(record["id"]), request, wait)
        except Unavailable:
            # The container ended (and its shim with it) after the check above.
            state, _ = self.store.state(record)
            if state == RUNNING:
                raise
            raise FailedPrecondition(f"cannot exec in container {record['id'][:12]}: it exited") from None
        if reply.get("timed_out"):
            raise DeadlineExceeded(f"command {command!r} timed out after {timeout:g}s and was killed")
        return {
            "stdout": base64.b64decode(reply["stdout"]),
            "stderr": base64.b64decode(reply["stderr"]),
            "exit_code": int(reply["exit_code"]),
        }

    def reopen_log(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._running(params, "reopen the log of")
        shim_request(self.store.control_socket(record["id"]), {"op": "reopen_log"}, SHIM_REQUEST_TIMEOUT)
        return {}

    def attach_info(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._record(params)
        state, _ = self.store.state(record)
        return {
            "attach_socket": self.store.attach_socket(record["id"]),
            "tty": record["tty"],
            "stdin": record["stdin"],
            "stdin_once": record["stdin_once"],
            "running": state == RUNNING,
        }

    def exec_info(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._record(params)
        state, _ = self.store.state(record)
        return {
            "runtime_path": record["runtime_path"],
            "runtime_root": record["runtime_root"],
            "runtime_id": record["id"],
            "running": state == RUNNING,
        }

    def resize(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._running(params, "resize")
        if not record["tty"]:
            raise FailedPrecondition(f"container {record['id'][:12]} has no TTY to resize")
        request = {"op": "resize", "width": int(params.get("width", 0)), "height": int(params.get("height", 0))}
        shim_request(self.store.control_socket(record["id"]), request, SHIM_REQUEST_TIMEOUT)
        return {}

    # --- resources and stats ---------------------------------------------------------------

    def update_resources(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._record(params)
        linux = params.get("linux") or {}
        spec_validation.validate_resources(linux, "linux")
        with self.store.lock_for(record["id"]):
            state, _ = self.store.state(record)
            if state not in (CREATED, RUNNING):
                raise FailedPrecondition(f"container {record['id'][:12]} is {self._state_word(state)}: cannot update its resources")
            resources = self.cgroups.oci_resources(linux)
            if resources:
                self._runtime(record, "update", "--resources", "-", record["id"], stdin=json.dumps(resources).encode())
            merged = dict(record.get("resources") or {})
            merged.update(linux)
            record["resources"] = merged
            self.store.save(record)
        return {}

    def update_sandbox_resources(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        sandbox = self._sandbox(params.get("sandbox_id", ""))
        limits = pod_resources.update(self.config, self.cgroups, sandbox, params.get("resources") or {},
                                      params.get("overhead") or {})
        log.info("pod resources updated", extra={"sandbox_id": sandbox["id"], "resources": limits})
        return {}

    def sandbox_stats(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        """sandbox id -> its own cgroup's figures, for the given {id, cgroup_parent} of netd's records."""
        found = {}
        for sandbox in params.get("sandboxes") or []:
            figures = pod_resources.stats(self.config, self.cgroups, sandbox)
            if figures:
                found[sandbox["id"]] = figures
        return found

    def _stats(self, record: dict[str, Any]) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "pod_sandbox_id": record["sandbox_id"],  # for pod stats; not a ContainerStats field
            "attributes": {
                "id": record["id"],
                "metadata": record["metadata"],
                "labels": record["labels"],
                "annotations": record["annotations"],
            },
        }
        stats.update(self.cgroups.stats(record.get("cgroups_path", "")))
        now = time.time_ns()
        # Pod-level figures crigw's PodSandboxStats takes (not ContainerStats fields).
        if self.store.init_alive(record):
            network = network_stats.network_usage(int(record["pid"]))
            if network is not None:
                stats["pod_network"] = network
        count = self.cgroups.process_count(record.get("cgroups_path", ""))
        if count is not None:
            stats["process_count"] = count
        if record.get("cgroups_path"):
            stats["oom_kills"] = self.cgroups.oom_kills(record["cgroups_path"])  # ListPodSandboxMetrics
        stats["image"] = reported_image(record).get("image", "")
        stats["started_at"] = record.get("started_at", 0)
        try:
            usage = self.imaged.call("rootfs.usage", {"container_id": record["id"]}, timeout=5.0, idempotent=True)
            stats["writable_layer"] = {
                "timestamp": now,
                "fs_id": {"mountpoint": self.config.image.store_dir},
                "used_bytes": {"value": int(usage.get("used_bytes", 0))},
                "inodes_used": {"value": int(usage.get("inodes_used", 0))},
            }
        except PyrioError as exc:
            log.debug("no writable layer usage", extra={"container_id": record["id"], "error": str(exc)})
        return stats

    def stats(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        return self._stats(self._record(params))

    def list_stats(self, params: dict[str, Any], call: CallContext) -> list[dict[str, Any]]:
        records = []
        for record in self._filtered(params.get("filter") or {}):
            state, _ = self.store.state(record)
            if state in (CREATED, RUNNING):
                records.append(record)
        return list(self._pool.map(self._stats, records))


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

