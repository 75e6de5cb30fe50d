"""The systemd cgroup driver's names: slices, scopes and runc's `slice:prefix:name` cgroupsPath."""

from __future__ import annotations

import re
from typing import Any

from common.cgroups.hierarchy import Hierarchy
from common.cgroups.resources import cpu_weight, oci_resources, swap_max
from common.errors import InvalidArgument

SLICE_SUFFIX = ".slice"
ROOT_SLICE = "-.slice"
UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+$")


def expand_slice(slice_name: str) -> str:
    """The cgroup path of a slice: "kubepods-burstable-pod1.slice" ->
    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice" (runc's ExpandSlice)."""
    if not slice_name.endswith(SLICE_SUFFIX) or len(slice_name) <= len(SLICE_SUFFIX) or "/" in slice_name:
        raise InvalidArgument(
            f"cgroup parent {slice_name!r} is not a systemd slice name: with the systemd cgroup driver it must be "
            "like kubepods-burstable-pod<uid>.slice"
        )
    name = slice_name[: -len(SLICE_SUFFIX)]
    if slice_name == ROOT_SLICE:
        return "/"
    if not UNIT_NAME.match(slice_name):
        raise InvalidArgument(f"cgroup parent {slice_name!r} has characters a systemd unit name cannot have")
    path, prefix = "", ""
    for component in name.split("-"):
        if not component:
            raise InvalidArgument(f"cgroup parent {slice_name!r} is not a valid slice name: empty part between dashes")
        path += f"/{prefix}{component}{SLICE_SUFFIX}"
        prefix += f"{component}-"
    return path


def slice_of(parent: str) -> str:
    """A pod's cgroup parent as a slice name. CRI says a runtime may convert the cgroupfs syntax
    to systemd's: "/kubepods/burstable/pod1" -> "kubepods-burstable-pod1.slice", a '-' inside a
    part becoming '_', as the kubelet's own conversion does. A slice name stays as it is, and so
    does the expanded path of one, which is what the kubelet's systemd driver sends
    ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice"): its last part
    is the slice (as CRI-O takes it), once the path is checked to be that slice's own."""
    if parent.endswith(SLICE_SUFFIX):
        slice_name = parent.rstrip("/").rsplit("/", 1)[-1]
        expanded = expand_slice(slice_name)
        if "/" in parent and "/" + parent.strip("/") != expanded:
            raise InvalidArgument(
                f"cgroup parent {parent!r} is not the path of slice {slice_name!r}, which is {expanded!r}"
            )
        return slice_name
    if not parent.startswith("/"):
        raise InvalidArgument(
            f"cgroup parent {parent!r} is neither a systemd slice name (kubepods-burstable-pod<uid>.slice) "
            "nor an absolute cgroup path"
        )
    parts = [part for part in parent.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise InvalidArgument(f"cgroup parent {parent!r} must not have . or .. parts")
    if not parts:
        return ROOT_SLICE
    name = "-".join(part.replace("-", "_") for part in parts) + SLICE_SUFFIX
    expand_slice(name)
    return name


def scope_name(prefix: str, name: str) -> str:
    return f"{prefix}-{name}.scope"


def runc_cgroups_path(parent: str, prefix: str, name: str) -> str:
    """linux.cgroupsPath for runc/crun --systemd-cgroup: the unit is <prefix>-<name>.scope in <parent>."""
    expand_slice(parent)
    return f"{parent}:{prefix}:{name}"


def cgroup_of(cgroups_path: str) -> str:
    """The cgroup (path in the hierarchy) of a `slice:prefix:name` cgroupsPath."""
    parts = cgroups_path.split(":")
    if len(parts) != 3:
        raise InvalidArgument(f"cgroupsPath {cgroups_path!r} is not in the systemd driver's slice:prefix:name form")
    parent, prefix, name = parts
    return f"{expand_slice(parent or 'system.slice').rstrip('/')}/{scope_name(prefix, name)}"


def unit_properties(resources: dict[str, Any], hierarchy: Hierarchy) -> list[tuple[str, tuple[str, Any]]]:
    """The systemd unit properties for CRI resources, as runc's systemd driver sets them on a unit
    (so a daemon-reload keeps them); what systemd has no property for is written as files."""
    oci = oci_resources(resources, hierarchy)
    cpu, memory = oci.get("cpu") or {}, oci.get("memory") or {}
    properties: list[tuple[str, tuple[str, Any]]] = []
    if "shares" in cpu:
        if hierarchy.unified:
            properties.append(("CPUWeight", ("t", cpu_weight(cpu["shares"]))))
        else:
            properties.append(("CPUShares", ("t", cpu["shares"])))
    if cpu.get("quota", 0) > 0:
        period = cpu.get("period") or 100000
        per_second = cpu["quota"] * 1_000_000 // period
        # systemd keeps quotas in 10 ms steps: round up as runc does.
        if per_second % 10000:
            per_second = (per_second // 10000 + 1) * 10000
        properties.append(("CPUQuotaPerSecUSec", ("t", per_second)))
        properties.append(("CPUQuotaPeriodUSec", ("t", period)))
    if "limit" in memory:
        properties.append(("MemoryMax" if hierarchy.unified else "MemoryLimit", ("t", memory["limit"])))
        if hierarchy.unified and "swap" in memory:
            swap = swap_max(memory["limit"], memory["swap"])
            properties.append(("MemorySwapMax", ("t", (1 << 64) - 1 if swap == "max" else int(swap))))
    return properties
