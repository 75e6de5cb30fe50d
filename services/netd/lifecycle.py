"""Run, stop and remove pod sandboxes, crash-safely.

RunPodSandbox writes a `creating` record before it touches the node and
saves every path it is about to create before creating it, so whatever point
a SIGKILL hits, the record says what to undo: `recover()` at the next start
tears such records down (CNI DEL with the cached config, PID holder, pins,
shm, files). A run that fails tears down the same way before answering.
Each step of the teardown is idempotent, so Stop and Remove can be retried.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from common import mounts
from common.cgroups import CgroupManager, manager_for
from common.cgroups.parent_check import check_cgroup_parent
from common.config import Config
from common.errors import Internal, InvalidArgument, NotFound, PyrioError
from common.ids import new_id
from common.runtime_features import handler_features
from common.userns import user_namespace_options
from services.netd import namespaces, pod_files, sysctls
from services.netd.cni import CniRunner, pod_ips
from services.netd.cni_config import NetworkConfig, load_network
from services.netd.userns import pin_in_user_namespace
from services.netd.sandboxes import CREATING, NOTREADY, READY, SandboxStore, matches_filter

log = logging.getLogger("pyrio.netd.sandboxes")

# CRI NamespaceMode numbers, as carried in the PodSandboxConfig dict.
NAMESPACE_MODES = {0: "POD", 1: "CONTAINER", 2: "NODE", 3: "TARGET"}


def _namespace_options(config: dict[str, Any]) -> dict[str, str]:
    options = ((config.get("linux") or {}).get("security_context") or {}).get("namespace_options") or {}
    modes = {kind: NAMESPACE_MODES.get(int(options.get(kind, 0)), "?") for kind in ("network", "pid", "ipc")}
    if modes["network"] not in ("POD", "NODE") or modes["ipc"] not in ("POD", "NODE"):
        raise InvalidArgument(f"pod network and IPC namespace modes must be POD or NODE, got {modes}")
    if modes["pid"] not in ("POD", "CONTAINER", "NODE"):
        raise InvalidArgument(f"pod PID namespace mode must be POD, CONTAINER or NODE, got {modes['pid']}")
    return modes


def _user_namespace(config: dict[str, Any], runtime_path: str, runtime_handler: str, modes: dict[str, str]) -> dict[str, Any] | None:
    """The pod's user namespace mappings (None: the node's), refused where it cannot work."""
    userns = user_namespace_options((config.get("linux") or {}).get("security_context") or {})
    if userns is None:
        return None
    if not handler_features(runtime_path).user_namespaces:
        raise InvalidArgument(
            f"runtime handler {runtime_handler or 'default'!r} ({runtime_path}) does not support user namespaces "
            "(it has no idmapped mounts; Status runtime_handlers tells which handler does)"
        )
    if modes["pid"] == "POD":
        raise InvalidArgument("a pod with its own user namespace cannot share a PID namespace in pyrio "
                              "(shareProcessNamespace with hostUsers: false)")
    if "NODE" in (modes["network"], modes["ipc"]):
        raise InvalidArgument("a pod with its own user namespace cannot use the node's network or IPC namespace")
    return userns


def _validate_port_mappings(port_mappings: list[dict[str, Any]]) -> None:
    for mapping in port_mappings:
        container_port = int(mapping.get("container_port", 0))
        host_port = int(mapping.get("host_port", 0))
        if not 0 < container_port <= 65535 or not 0 <= host_port <= 65535:
            raise InvalidArgument(f"port mapping {mapping} has a port outside 1-65535")
        if int(mapping.get("protocol", 0)) not in (0, 1, 2):
            raise InvalidArgument(f"port mapping {mapping} has an unknown protocol")
        pod_files.validate_host_ip(str(mapping.get("host_ip", "")))


class SandboxManager:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.service_state_dir("netd")
        self.run_dir = config.pyrio.run_dir
        self.store = SandboxStore(self.state_dir / "sandboxes")
        self.cni = CniRunner(config, self.state_dir / "cni")
        self._cgroup_manager: CgroupManager | None = None

    def _cgroups(self) -> CgroupManager:
        """The node's cgroup manager, made on first use (pod cgroup parents, the PID holder's cgroup)."""
        if self._cgroup_manager is None:
            self._cgroup_manager = manager_for(self.config.runtime.cgroup_manager)
        return self._cgroup_manager

    # --- RunPodSandbox ----------------------------------------------------------

    def run(self, config: dict[str, Any], runtime_handler: str) -> str:
        metadata = config.get("metadata") or {}
        if not metadata.get("name") or not metadata.get("namespace") or not metadata.get("uid"):
            raise InvalidArgument("pod sandbox metadata needs a name, a namespace and a uid")
        handler = self.config.runtime_handler(runtime_handler)  # InvalidArgument when unknown
        modes = _namespace_options(config)
        userns = _user_namespace(config, handler.path, runtime_handler, modes)
        host_network = modes["network"] == "NODE"
        private = {kind for kind, mode in (("net", modes["network"]), ("ipc", modes["ipc"])) if mode == "POD"}
        pod_sysctls = sysctls.validate(
            (config.get("linux") or {}).get("sysctls") or {}, private, self.config.runtime.allowed_unsafe_sysctls
        )
        port_mappings = config.get("port_mappings") or []
        _validate_port_mappings(port_mappings)
        # InvalidArgument before anything exists.
        pod_files.validate_dns_config(config.get("dns_config"))
        pod_files.validate_log_directory(config.get("log_directory", ""))
        check_cgroup_parent((config.get("linux") or {}).get("cgroup_parent") or self.config.runtime.cgroup_parent,
                            self._cgroups(), self.config.runtime.cgroup_parent_root)
        hostname = config.get("hostname", "")
        if hostname:
            pod_files.validate_hostname(hostname)
        # Without a usable network a pod-network sandbox cannot run; a
        # hostNetwork one can (that is how a CNI plugin's own pods start).
        network = None if host_network else load_network(self.config)

        sandbox_id = new_id()
        if not hostname:
            hostname = socket.gethostname() if host_network else sandbox_id[:12]
        linux = config.get("linux") or {}
        record: dict[str, Any] = {
            "id": sandbox_id,
            "metadata": metadata,
            "state": CREATING,
            "created_at": time.time_ns(),
            "labels": config.get("labels") or {},
            "annotations": config.get("annotations") or {},
            "runtime_handler": runtime_handler,
            "cgroup_parent": linux.get("cgroup_parent") or self.config.runtime.cgroup_parent,
            "log_directory": config.get("log_directory", ""),
            "hostname": hostname,
            "namespace_options": modes,
            "namespaces": {"network": "", "ipc": "", "uts": "", "pid": "", "user": ""},
            "userns": userns,
            "pid_holder": 0,
            "files": {},
            "network": {"ip": "", "additional_ips": [], "name": network.name if network else ""},
            "sysctls": pod_sysctls,
            "config": config,
        }
        self.store.reserve(record)
        with self.store.operation_lock(sandbox_id):
            try:
                self._set_up(record, network, pod_sysctls)
            except BaseException as exc:
                log.warning("pod sandbox run failed; tearing down", extra={"sandbox_id": sandbox_id, "error": str(exc)})
                self._discard(record)
                if isinstance(exc, OSError):
                    raise Internal(f"cannot set up pod sandbox: {exc}") from exc
                raise
        log.info("pod sandbox ready", extra={"sandbox_id": sandbox_id, "ip": record["network"]["ip"]})
        return sandbox_id

    def _set_up(self, record: dict[str, Any], network: NetworkConfig | None, pod_sysctls: dict[str, str]) -> None:
        sandbox_id = record["id"]
        modes = record["namespace_options"]
        directory = pod_files.pod_dir(self.state_dir, sandbox_id)
        files = pod_files.write_pod_files(directory, record["hostname"], record["config"].get("dns_config"))
        files["shm"] = pod_files.HOST_SHM
        if modes["ipc"] == "POD":
            files["shm"] = str(directory / "shm")
        record["files"] = files
        # Every pin path is recorded before it exists, so a crash in between
        # still tells the next start what to unmount.
        pins: dict[str, str] = {}
        if modes["network"] == "POD":
            pins["net"] = namespaces.pin_path(self.run_dir, "net", sandbox_id)
            pins["uts"] = namespaces.pin_path(self.run_dir, "uts", sandbox_id)
        if modes["ipc"] == "POD":
            pins["ipc"] = namespaces.pin_path(self.run_dir, "ipc", sandbox_id)
        if modes["pid"] == "POD":
            record["namespaces"]["pid"] = namespaces.pin_path(self.run_dir, "pid", sandbox_id)
        if record.get("userns"):
            pins["user"] = namespaces.pin_path(self.run_dir, "user", sandbox_id)
        record["namespaces"].update(
            network=pins.get("net", ""), ipc=pins.get("ipc", ""), uts=pins.get("uts", ""), user=pins.get("user", "")
        )
        self.store.save(record)

        if modes["ipc"] == "POD":
            pod_files.mount_shm(directory, self.config.runtime.shm_size)
        if record.get("userns"):
            pin_in_user_namespace(pins, record["userns"], record["hostname"], pod_sysctls)
        else:
            namespaces.pin_namespaces(pins, record["hostname"] if "uts" in pins else "", pod_sysctls)
        if record["namespaces"]["pid"]:
            holder = namespaces.start_pid_holder(record["namespaces"]["pid"], sandbox_id)
            record["pid_holder"] = holder
            self.store.save(record)
            # In the pod's cgroup, as a pause container would be: its memory
            # is the pod's, and it is not left in netd's (or the root) cgroup.
            record["pid_holder_cgroup"] = self._cgroups().apply(
                holder, record["cgroup_parent"], holder_cgroup_name(sandbox_id), f"pyrio PID 1 of pod {sandbox_id}"
            )
            self.store.save(record)
        if network is not None:
            result = self.cni.add(
                sandbox_id,
                network,
                pins["net"],
                record["metadata"],
                record["config"].get("port_mappings") or [],
                record["config"].get("dns_config"),
            )
            addresses = pod_ips(result)
            record["network"].update(ip=addresses[0] if addresses else "", additional_ips=addresses[1:])
            pod_files.write_hosts(files["hosts"], record["hostname"], record["network"]["ip"])
        record["state"] = READY
        self.store.save(record)

    # --- teardown ---------------------------------------------------------------

    def _tear_down(self, record: dict[str, Any]) -> None:
        """Release the network, processes and mounts of a sandbox (idempotent).

        CNI DEL comes first and, when it fails, stops the teardown with the
        plugin's error: the namespace must stay for the retry to find the veth.
        """
        sandbox_id = record["id"]
        if record["namespace_options"]["network"] == "POD":
            self.cni.delete(sandbox_id)
        self._stop_pid_holder(record)
        for kind in ("network", "ipc", "uts", "pid", "user"):
            namespaces.unpin(record["namespaces"].get(kind, ""))
        pod_files.unmount_shm(pod_files.pod_dir(self.state_dir, sandbox_id))

    def _stop_pid_holder(self, record: dict[str, Any]) -> None:
        if record["namespace_options"]["pid"] != "POD":
            return
        pids = [record.get("pid_holder") or 0]
        if not pids[0]:
            # Killed between starting the holder and saving its pid: find it.
            pids = [pid for pid in _all_pids() if namespaces.is_pid_holder(pid, record["id"])]
        for pid in pids:
            namespaces.stop_pid_holder(pid, record["id"])
        if record.get("pid_holder"):
            # Named before it is made: a netd killed in between still finds it.
            self._cgroups().remove(record.get("pid_holder_cgroup") or self._holder_cgroup(record))

    def _holder_cgroup(self, record: dict[str, Any]) -> str:
        """Where CgroupManager.apply puts the holder (a directory, or a scope with systemd)."""
        try:
            parent = self._cgroups().parent_cgroup(record["cgroup_parent"])
        except InvalidArgument:
            return ""
        suffix = ".scope" if self._cgroups().systemd else ""
        return f"{parent.rstrip('/')}/{holder_cgroup_name(record['id'])}{suffix}"

    def _discard(self, record: dict[str, Any]) -> None:
        """Undo a run that failed or was interrupted, then forget it.

        If the teardown itself fails, the record is kept as NOTREADY so the
        kubelet sees it and its garbage collection retries with Remove.
        """
        try:
            self._tear_down(record)
            pod_files.remove_pod_files(pod_files.pod_dir(self.state_dir, record["id"]))
        except (PyrioError, OSError) as exc:
            log.error("cannot clean up pod sandbox", extra={"sandbox_id": record["id"], "error": str(exc)})
            record["state"] = NOTREADY
            self.store.save(record)
            return
        self.store.delete(record["id"])

    def recover(self) -> None:
        """At start: tear down the sandboxes whose run was interrupted, and
        mark NOTREADY the ready ones whose namespaces are gone (after a node
        reboot): the kubelet then stops and removes them, and that releases
        their IPs and port mappings with the cached CNI config."""
        mounted = {os.path.realpath(point) for point in mounts.mount_points()}
        for record in self.store.all():
            if record["state"] == CREATING:
                log.warning("cleaning up interrupted pod sandbox run", extra={"sandbox_id": record["id"]})
                self._discard(record)
            elif record["state"] == READY:
                lost = _lost_namespace(record, mounted)
                if lost:
                    log.warning("pod sandbox lost its namespaces; it is not ready", extra={"sandbox_id": record["id"], "reason": lost})
                    record["state"] = NOTREADY
                    self.store.save(record)

    # --- StopPodSandbox / RemovePodSandbox -------------------------------------

    def stop(self, given_id: str) -> None:
        try:
            sandbox_id = self.store.resolve(given_id)
        except NotFound:
            return  # already removed: nothing left to stop
        with self.store.operation_lock(sandbox_id):
            record = self.store.get(sandbox_id)
            self._tear_down(record)
            if record["state"] != NOTREADY:
                record["state"] = NOTREADY
                self.store.save(record)
        log.info("pod sandbox stopped", extra={"sandbox_id": sandbox_id})

    def remove(self, given_id: str) -> None:
        try:
            sandbox_id = self.store.resolve(given_id)
        except NotFound:
            return  # removing a removed sandbox succeeds (CRI idempotency)
        with self.store.operation_lock(sandbox_id):
            try:
                record = self.store.get(sandbox_id)
            except NotFound:
                return
            self._tear_down(record)
            pod_files.remove_pod_files(pod_files.pod_dir(self.state_dir, sandbox_id))
            self.store.delete(sandbox_id)
        log.info("pod sandbox removed", extra={"sandbox_id": sandbox_id})

    # --- queries ----------------------------------------------------------------

    def status(self, given_id: str) -> dict[str, Any]:
        return _current(self.store.get(self.store.resolve(given_id)))

    def list(self, filter_: dict[str, Any]) -> list[dict[str, Any]]:
        if filter_.get("ids") is not None:
            filter_ = {**filter_, "ids": set(filter_["ids"])}
        return [
            record
            for record in map(_current, self.store.all())
            if record["state"] != CREATING and matches_filter(record, filter_)
        ]

    def brief(self, filter_: dict[str, Any]) -> list[list[str]]:
        """[id, state] of each listed sandbox matching the filter, oldest first."""
        brief = []
        for record in self.store.listed():
            state = _current_state(record)
            if filter_.get("state") and state != filter_["state"]:
                continue
            if matches_filter(record, {**filter_, "state": None}):
                brief.append([record["id"], state])
        return brief

    def check(self, given_id: str) -> None:
        sandbox_id = self.store.resolve(given_id)
        record = self.store.get(sandbox_id)
        if record["namespace_options"]["network"] == "POD" and record["state"] == READY:
            self.cni.check(sandbox_id)


def holder_cgroup_name(sandbox_id: str) -> str:
    return f"pyrio-pod-{sandbox_id}"


def _current_state(record: dict[str, Any]) -> str:
    """The state as it stands now: a ready pod whose network namespace pin
    vanished (the run dir was wiped under a running netd), or whose PID 1 is
    gone (killed from the node: nothing in the pod can), is not ready."""
    if record["state"] != READY:
        return record["state"]
    if record["namespaces"]["network"] and not os.path.exists(record["namespaces"]["network"]):
        return NOTREADY
    if record["namespace_options"]["pid"] == "POD" and not namespaces.is_pid_holder(
        int(record.get("pid_holder") or 0), record["id"]
    ):
        return NOTREADY
    return READY


def _current(record: dict[str, Any]) -> dict[str, Any]:
    state = _current_state(record)
    if state != record["state"] and record["namespace_options"]["pid"] == "POD":
        namespaces.reap(int(record.get("pid_holder") or 0))
    record["state"] = state
    return record


def _lost_namespace(record: dict[str, Any], mounted: set[str]) -> str:
    """Why a ready sandbox's namespaces are gone, "" when all are there."""
    for kind in ("network", "ipc", "uts", "pid", "user"):
        path = record["namespaces"].get(kind, "")
        if path and os.path.realpath(path) not in mounted:
            return f"the pin of its {kind} namespace ({path}) is gone"
    if record["namespace_options"]["pid"] == "POD" and not namespaces.is_pid_holder(
        int(record.get("pid_holder") or 0), record["id"]
    ):
        return "the PID 1 of its PID namespace is gone"
    return ""


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
