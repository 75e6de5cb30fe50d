"""CRI LinuxContainerResources, as the OCI runtime spec's linux.resources and as cgroup files.

Containers get their resources through the runtime (runc/crun apply the OCI
object at create and at `update`); pod cgroups, which no runtime owns, get
the same values written as files by `file_values`, converted the way runc
converts them for each hierarchy.
"""

from __future__ import annotations

import logging
from typing import Any

from common.cgroups.hierarchy import Hierarchy
from common.errors import InvalidArgument

log = logging.getLogger("pyrio.cgroups")

DEFAULT_CPU_PERIOD = 100000
# Unified keys that name no controller but are fine to write.
CORE_UNIFIED_KEYS = ("cgroup.max.depth", "cgroup.max.descendants", "cgroup.freeze")


def cpu_weight(shares: int) -> int:
    """cgroup v2 cpu.weight (1..10000) from v1 cpu.shares (2..262144), as runc and the kubelet convert it."""
    if shares <= 0:
        return 0
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def swap_max(memory_limit: int, memory_swap: int) -> str:
    """cgroup v2 memory.swap.max from OCI's memory+swap total, as runc converts it."""
    if memory_swap == -1:
        return "max"
    if memory_limit <= 0:
        raise InvalidArgument("a swap limit needs a memory limit")
    if memory_swap < memory_limit:
        raise InvalidArgument(f"memory_swap_limit_in_bytes ({memory_swap}) must not be below memory_limit_in_bytes ({memory_limit})")
    return str(memory_swap - memory_limit)


def swap_supported(hierarchy: Hierarchy) -> bool:
    if hierarchy.unified:
        # The root cgroup has no swap files: look at this process's own cgroup.
        return _own_v2_cgroup_file(hierarchy, "memory.swap.max") or (hierarchy.root / "memory.swap.max").exists()
    return (hierarchy.root / "memory" / "memory.memsw.limit_in_bytes").exists()


def _own_v2_cgroup_file(hierarchy: Hierarchy, name: str) -> bool:
    try:
        with open("/proc/self/cgroup") as handle:
            for line in handle:
                if line.startswith("0::"):
                    return (hierarchy.root / line[3:].strip().lstrip("/") / name).exists()
    except OSError:
        pass
    return False


def check_unified(hierarchy: Hierarchy, unified: dict[str, str]) -> None:
    """Refuse what the runtime could not write: v2 keys on a v1 host, keys of absent controllers."""
    if not unified:
        return
    if not hierarchy.unified:
        raise InvalidArgument(
            f"unified cgroup resources ({', '.join(sorted(unified))}) need a cgroup v2 host; this host uses cgroup {hierarchy.mode}"
        )
    for key in unified:
        controller, dot, rest = key.partition(".")
        if not dot or not rest or "/" in key:
            raise InvalidArgument(f"unified cgroup key {key!r} is not a cgroup v2 file name like memory.high")
        if controller == "cgroup":
            if key not in CORE_UNIFIED_KEYS:
                raise InvalidArgument(f"unified cgroup key {key!r} is not one a container may set")
            continue
        if not hierarchy.has(controller):
            available = " ".join(sorted(hierarchy.controllers)) or "none"
            raise InvalidArgument(
                f"unified cgroup key {key!r} needs the {controller} controller, which this host's cgroup v2 "
                f"hierarchy does not have (available: {available})"
            )


def oci_resources(resources: dict[str, Any], hierarchy: Hierarchy) -> dict[str, Any]:
    """linux.resources from CRI LinuxContainerResources (create and UpdateContainerResources)."""
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
        if swap_supported(hierarchy):
            swap = int(resources.get("memory_swap_limit_in_bytes") or 0)
            # No swap beyond the memory limit unless the kubelet asks for it.
            memory["swap"] = swap if swap != 0 else limit
    if memory:
        result["memory"] = memory
    hugepages = resources.get("hugepage_limits") or []
    if hugepages:
        if hierarchy.has("hugetlb"):
            result["hugepageLimits"] = [
                {"pageSize": entry.get("page_size", ""), "limit": int(entry.get("limit", 0))} for entry in hugepages
            ]
        else:
            # As CRI-O: the kubelet sends limits for every page size it knows.
            log.info("dropping hugepage limits: no hugetlb cgroup controller on this host",
                     extra={"hugepage_limits": hugepages})
    unified = {str(key): str(value) for key, value in (resources.get("unified") or {}).items()}
    if unified:
        check_unified(hierarchy, unified)
        result["unified"] = unified
    return result


def file_values(resources: dict[str, Any], hierarchy: Hierarchy) -> dict[str, str]:
    """The cgroup files (relative to the cgroup: "cpu.max", "memory/memory.limit_in_bytes") and
    their values for CRI resources, converted for this hierarchy as runc converts them."""
    oci = oci_resources(resources, hierarchy)
    cpu, memory = oci.get("cpu") or {}, oci.get("memory") or {}
    files: dict[str, str] = {}
    if hierarchy.unified:
        if "shares" in cpu:
            files["cpu.weight"] = str(cpu_weight(cpu["shares"]))
        if "quota" in cpu or "period" in cpu:
            quota = cpu.get("quota", -1)
            files["cpu.max"] = f"{quota if quota > 0 else 'max'} {cpu.get('period') or DEFAULT_CPU_PERIOD}"
        if "cpus" in cpu:
            files["cpuset.cpus"] = cpu["cpus"]
        if "mems" in cpu:
            files["cpuset.mems"] = cpu["mems"]
        if "limit" in memory:
            files["memory.max"] = str(memory["limit"])
            if "swap" in memory:
                files["memory.swap.max"] = swap_max(memory["limit"], memory["swap"])
        for entry in oci.get("hugepageLimits") or []:
            files[f"hugetlb.{entry['pageSize']}.max"] = str(entry["limit"])
        files.update(oci.get("unified") or {})
        return files
    if "shares" in cpu:
        files["cpu/cpu.shares"] = str(cpu["shares"])
    if "period" in cpu:
        files["cpu/cpu.cfs_period_us"] = str(cpu["period"])
    if "quota" in cpu:
        files["cpu/cpu.cfs_quota_us"] = str(cpu["quota"])
    if "cpus" in cpu:
        files["cpuset/cpuset.cpus"] = cpu["cpus"]
    if "mems" in cpu:
        files["cpuset/cpuset.mems"] = cpu["mems"]
    if "limit" in memory:
        files["memory/memory.limit_in_bytes"] = str(memory["limit"])
        if "swap" in memory:
            files["memory/memory.memsw.limit_in_bytes"] = str(memory["swap"])
    for entry in oci.get("hugepageLimits") or []:
        files[f"hugetlb/hugetlb.{entry['pageSize']}.limit_in_bytes"] = str(entry["limit"])
    return files
