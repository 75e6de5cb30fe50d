"""CPU and memory figures of a container, read from its cgroup files (v1 and v2)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from services.shimd.spec_resources import CgroupLayout


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                values[key] = int(value)
    except OSError:
        pass
    return values


def container_usage(layout: CgroupLayout, cgroups_path: str) -> dict[str, Any]:
    """CRI-shaped cpu and memory usage (ContainerStats.cpu / .memory), {} when the cgroup is gone."""
    now = time.time_ns()
    dirs = layout.container_dirs(cgroups_path)
    usage: dict[str, Any] = {}
    if layout.unified:
        base = dirs["unified"]
        cpu_stat = _read_keyed(base / "cpu.stat")
        cpu_ns = cpu_stat["usage_usec"] * 1000 if "usage_usec" in cpu_stat else None
        memory_usage = _read_int(base / "memory.current")
        memory_stat = _read_keyed(base / "memory.stat")
        inactive_file = memory_stat.get("inactive_file", 0)
        rss = memory_stat.get("anon")
        faults, major_faults = memory_stat.get("pgfault"), memory_stat.get("pgmajfault")
    else:
        cpu_ns = _read_int(dirs["cpuacct"] / "cpuacct.usage") if "cpuacct" in dirs else None
        memory_dir = dirs.get("memory")
        memory_usage = _read_int(memory_dir / "memory.usage_in_bytes") if memory_dir else None
        memory_stat = _read_keyed(memory_dir / "memory.stat") if memory_dir else {}
        inactive_file = memory_stat.get("total_inactive_file", 0)
        rss = memory_stat.get("total_rss")
        faults, major_faults = memory_stat.get("total_pgfault"), memory_stat.get("total_pgmajfault")
    if cpu_ns is not None:
        usage["cpu"] = {"timestamp": now, "usage_core_nano_seconds": {"value": cpu_ns}}
    if memory_usage is not None:
        memory: dict[str, Any] = {
            "timestamp": now,
            # The kubelet's working set: usage minus what the kernel can drop at once.
            "working_set_bytes": {"value": max(0, memory_usage - inactive_file)},
            "usage_bytes": {"value": memory_usage},
        }
        if rss is not None:
            memory["rss_bytes"] = {"value": rss}
        if faults is not None:
            memory["page_faults"] = {"value": faults}
        if major_faults is not None:
            memory["major_page_faults"] = {"value": major_faults}
        usage["memory"] = memory
    return usage



def network_usage(pid: int) -> dict[str, Any] | None:
    """CRI NetworkUsage of the network namespace a process is in (its pod's),
    from /proc/PID/net/dev: no need to enter the namespace."""
    try:
        with open(f"/proc/{pid}/net/dev") as handle:
            lines = handle.read().splitlines()[2:]
    except OSError:
        return None
    interfaces = []
    for line in lines:
        name, _, counters = line.partition(":")
        name, fields = name.strip(), counters.split()
        if name == "lo" or len(fields) < 16:
            continue
        interfaces.append({
            "name": name,
            "rx_bytes": {"value": int(fields[0])},
            "rx_errors": {"value": int(fields[2])},
            "tx_bytes": {"value": int(fields[8])},
            "tx_errors": {"value": int(fields[10])},
        })
    if not interfaces:
        return None
    default = next((item for item in interfaces if item["name"] == "eth0"), interfaces[0])
    return {"timestamp": time.time_ns(), "default_interface": default, "interfaces": interfaces}


def process_count(layout: CgroupLayout, cgroups_path: str) -> int | None:
    """How many processes the container's cgroup holds."""
    dirs = layout.container_dirs(cgroups_path)
    directory = dirs.get("unified") or dirs.get("pids") or dirs.get("memory")
    if directory is None:
        return None
    try:
        return len((directory / "cgroup.procs").read_text().split())
    except OSError:
        return None
