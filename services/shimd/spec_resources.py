"""Cgroup resources of a container: the host's cgroup layout, linux.resources
from CRI LinuxContainerResources, and the container's cgroups path."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import InvalidArgument

log = logging.getLogger("pyrio.shimd.spec")

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class CgroupLayout:
    """Which cgroup hierarchy runc will use on this host."""

    unified: bool
    controllers: set[str] = field(default_factory=set)
    root: Path = CGROUP_ROOT

    @classmethod
    def detect(cls, root: Path = CGROUP_ROOT) -> "CgroupLayout":
        if (root / "cgroup.controllers").exists():
            return cls(unified=True, controllers=set((root / "cgroup.controllers").read_text().split()), root=root)
        controllers = set()
        if root.is_dir():
            for entry in root.iterdir():
                controllers.update(entry.name.split(","))
        return cls(unified=False, controllers=controllers, root=root)

    def has(self, controller: str) -> bool:
        return controller in self.controllers

    def container_dirs(self, cgroups_path: str) -> dict[str, Path]:
        """controller -> the container's cgroup directory for stats and OOM."""
        relative = cgroups_path.strip("/")
        if self.unified:
            return {name: self.root / relative for name in ("cpu", "memory", "pids", "unified")}
        return {name: self.root / name / relative for name in ("cpu", "cpuacct", "memory", "pids") if self.has(name)}

    def oom_files(self, cgroups_path: str) -> list[str]:
        relative = cgroups_path.strip("/")
        if self.unified:
            return [str(self.root / relative / "memory.events")]
        return [str(self.root / "memory" / relative / "memory.oom_control")]

    def swap_supported(self) -> bool:
        if self.unified:
            return True
        return (self.root / "memory" / "memory.memsw.limit_in_bytes").exists()


def own_oom_score_adj() -> int:
    try:
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return 0


def oci_resources(resources: dict[str, Any], layout: CgroupLayout) -> dict[str, Any]:
    """linux.resources from CRI LinuxContainerResources (also used by UpdateContainerResources)."""
    result: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if resources.get("cpu_shares"):
        cpu["shares"] = int(resources["cpu_shares"])
    if resources.get("cpu_quota"):
        cpu["quota"] = int(resources["cpu_quota"])
    if resources.get("cpu_period"):
        cpu["period"] = int(resources["cpu_period"])
    if resources.get("cpuset_cpus"):
        cpu["cpus"] = resources["cpuset_cpus"]
    if resources.get("cpuset_mems"):
        cpu["mems"] = resources["cpuset_mems"]
    if cpu:
        result["cpu"] = cpu
    memory: dict[str, Any] = {}
    limit = int(resources.get("memory_limit_in_bytes") or 0)
    if limit > 0:
        memory["limit"] = limit
        if layout.swap_supported():
            swap = int(resources.get("memory_swap_limit_in_bytes") or 0)
            # No swap beyond the memory limit unless the kubelet asks for it.
            memory["swap"] = swap if swap > 0 else limit
    if memory:
        result["memory"] = memory
    hugepages = resources.get("hugepage_limits") or []
    if hugepages:
        if layout.has("hugetlb"):
            result["hugepageLimits"] = [
                {"pageSize": entry.get("page_size", ""), "limit": int(entry.get("limit", 0))} for entry in hugepages
            ]
        else:
            log.info("dropping hugepage limits: no hugetlb cgroup controller on this host",
                     extra={"hugepage_limits": hugepages})
    unified = resources.get("unified") or {}
    if unified:
        if layout.unified:
            result["unified"] = dict(unified)
        else:
            raise InvalidArgument("unified cgroup resources need a cgroup v2 host; this host uses cgroup v1")
    return result


def cgroups_path(config: Config, sandbox: dict[str, Any], container_id: str) -> str:
    parent = sandbox.get("cgroup_parent") or config.runtime.cgroup_parent
    return f"{parent.rstrip('/')}/pyrio-{container_id}"
