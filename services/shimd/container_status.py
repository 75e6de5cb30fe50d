"""Container status, listing, resource updates and stats RPCs."""

from __future__ import annotations

import json
import logging
import signal
import time
from typing import Any

from common.errors import FailedPrecondition, InvalidArgument, PyrioError
from common.rpc import CallContext
from services.shimd import network_stats, pod_resources, spec_validation
from services.shimd.records import CREATED, PHASE_CREATED, RUNNING
from services.shimd.container_signals import cri_signal

log = logging.getLogger("pyrio.shimd")


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


class ContainerStatus:
    """container.status/statuses/list, update_resources and stats (part of ShimDaemon)."""

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
