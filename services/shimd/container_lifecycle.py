"""Container lifecycle RPCs: create, start, stop, remove, and a closing pod's
stop_all/remove_all.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from common.exec_limits import MAX_STOP_TIMEOUT_SECONDS, clamp_timeout
from common.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PyrioError,
    Unavailable,
)
from common.ids import new_id
from common.rpc import CallContext
from common.state import atomic_write_bytes, atomic_write_json, remove_file
from common.cgroups.parent_check import check_cgroup_parent
from services.shimd import cgroup_leftovers, oci_spec, spec_mounts, spec_resources, spec_validation
from services.shimd.records import (
    CREATED,
    EXITED,
    PHASE_CREATED,
    PHASE_CREATING,
    PHASE_REMOVING,
    RUNNING,
    current_boot_id,
    process_start_time,
)
from services.shimd import spec_userns, userns_staging
from services.shimd.shim_client import shim_request, spawn_shim
from services.shimd.container_signals import signal_number

log = logging.getLogger("pyrio.shimd")

SANDBOX_READY_STATES = (0, "SANDBOX_READY", "READY", "ready")
# A stop waits the grace period, SIGKILL, then at most this long for the exit.
STOP_MARGIN_SECONDS = 15.0
# How long shimd itself remembers that a pod was stopped or removed.
CLOSING_MEMORY_SECONDS = 3600.0


class ContainerLifecycle:
    """container.create/start/stop/remove/stop_all/remove_all (part of ShimDaemon)."""

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
        record = self.store.find(self._container_id(params))
        if record is None:
            return {}  # StopContainer is idempotent, as RemoveContainer (CRI-O and containerd agree)
        self._stop(record, clamp_timeout(float(params.get("timeout") or 0), MAX_STOP_TIMEOUT_SECONDS, "stop timeout"))
        return {}

    def _stop(self, record: dict[str, Any], timeout: float) -> None:
        with self.store.lock_for(record["id"]):
            state, _ = self.store.state(record)
            if state == EXITED or record.get("phase") != PHASE_CREATED:
                return
        # The grace period is waited out without the container's lock: a later
        # stop with a shorter timeout (the kubelet's forced delete, or
        # RemoveContainer's kill) must cut it short, as in CRI-O, not queue
        # behind it. The shim answers every stop waiting when the container exits.
        request = {"op": "stop", "signal": record.get("stop_signal", int(signal.SIGTERM)), "timeout": timeout}
        try:
            shim_request(self.store.control_socket(record["id"]), request, timeout + STOP_MARGIN_SECONDS)
            return
        except Unavailable:
            pass
        # No shim (killed), yet the container lives: signal it ourselves.
        if self.store.init_alive(record):
            self._stop_without_shim(record, timeout)
        with self.store.lock_for(record["id"]):
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
        record = self.store.find(self._container_id(params))
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
