"""cgroup v2: one unified tree; a controller works in a cgroup when its parent
lists it in cgroup.subtree_control."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from common.cgroups.files import memory_usage, read_int, read_keyed, remove_tree
from common.cgroups.hierarchy import Hierarchy


class V2Layout:
    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy

    def directory(self, cgroup: str) -> Path:
        return self.hierarchy.root / cgroup.strip("/")

    def directories(self, cgroup: str) -> dict[str, Path]:
        return {"unified": self.directory(cgroup)}

    def usage(self, cgroup: str) -> dict[str, Any]:
        now = time.time_ns()
        base = self.directory(cgroup)
        result: dict[str, Any] = {}
        cpu_stat = read_keyed(base / "cpu.stat")
        if "usage_usec" in cpu_stat:
            result["cpu"] = {"timestamp": now, "usage_core_nano_seconds": {"value": cpu_stat["usage_usec"] * 1000}}
        usage = read_int(base / "memory.current")
        if usage is not None:
            stat = read_keyed(base / "memory.stat")
            # memory.max reads "max" when unlimited: read_int gives None then.
            memory = memory_usage(now, usage, stat.get("inactive_file", 0), stat.get("anon"), stat.get("pgfault"),
                                  stat.get("pgmajfault"), read_int(base / "memory.max"))
            result["memory"] = memory
            swap = read_int(base / "memory.swap.current")
            if swap is not None:
                swap_usage: dict[str, Any] = {"timestamp": now, "swap_usage_bytes": {"value": swap}}
                swap_limit = read_int(base / "memory.swap.max")
                if swap_limit is not None:
                    swap_usage["swap_available_bytes"] = {"value": max(0, swap_limit - swap)}
                result["swap"] = swap_usage
        return result

    def peak(self, cgroup: str) -> int | None:
        """memory.peak (Linux 5.19+): the most memory the cgroup ever used."""
        return read_int(self.directory(cgroup) / "memory.peak")

    def procs_file(self, cgroup: str) -> Path:
        return self.directory(cgroup) / "cgroup.procs"

    def oom_files(self, cgroup: str) -> list[str]:
        return [str(self.directory(cgroup) / "memory.events")]

    def enable_controllers(self, cgroup: str) -> None:
        """Create the cgroup, turning on in each ancestor's cgroup.subtree_control the
        controllers the host has (what runc does for a cgroupfs path on v2)."""
        wanted = " ".join(f"+{name}" for name in sorted(self.hierarchy.controllers))
        directory = self.hierarchy.root
        for part in [part for part in cgroup.strip("/").split("/") if part]:
            if wanted:
                try:
                    (directory / "cgroup.subtree_control").write_text(wanted)
                except OSError:
                    # A cgroup holding processes cannot enable controllers for
                    # children ("no internal processes"); the file write then fails
                    # naming the file.
                    pass
            directory = directory / part
            directory.mkdir(exist_ok=True)

    def write(self, cgroup: str, files: dict[str, str], create: bool = True) -> None:
        """Write file values into the cgroup; `create`: make it first, enabling its controllers."""
        if create:
            self.enable_controllers(cgroup)
        directory = self.directory(cgroup)
        for name, value in files.items():
            (directory / name).write_text(value)

    def create(self, cgroup: str, pid: int | None = None) -> None:
        self.enable_controllers(cgroup)
        directory = self.directory(cgroup)
        if pid is not None:
            (directory / "cgroup.procs").write_text(str(pid))

    def remove(self, cgroup: str) -> None:
        remove_tree(self.directory(cgroup))
