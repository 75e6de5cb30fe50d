"""cgroup v1 (and systemd's hybrid layout): one directory per controller."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from common.cgroups.files import memory_usage, read_int, read_keyed, remove_tree
from common.cgroups.hierarchy import Hierarchy

# A limit at or past this is v1's "no limit" (PAGE_COUNTER_MAX pages).
V1_UNLIMITED = 1 << 62
STATS_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")


class V1Layout:
    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy

    def directories(self, cgroup: str) -> dict[str, Path]:
        """controller -> this cgroup's directory in that controller's hierarchy."""
        relative = cgroup.strip("/")
        return {name: self.hierarchy.root / name / relative
                for name in sorted(self.hierarchy.controllers) if name != "systemd"}

    def usage(self, cgroup: str) -> dict[str, Any]:
        now = time.time_ns()
        relative = cgroup.strip("/")
        root = self.hierarchy.root
        result: dict[str, Any] = {}
        cpu_ns = read_int(root / "cpuacct" / relative / "cpuacct.usage")
        if cpu_ns is not None:
            result["cpu"] = {"timestamp": now, "usage_core_nano_seconds": {"value": cpu_ns}}
        memory_dir = root / "memory" / relative
        usage = read_int(memory_dir / "memory.usage_in_bytes")
        if usage is not None:
            stat = read_keyed(memory_dir / "memory.stat")
            limit = read_int(memory_dir / "memory.limit_in_bytes")
            result["memory"] = memory_usage(
                now, usage, stat.get("total_inactive_file", 0), stat.get("total_rss"), stat.get("total_pgfault"),
                stat.get("total_pgmajfault"), limit if limit is not None and limit < V1_UNLIMITED else None,
            )
        return result

    def procs_file(self, cgroup: str) -> Path:
        relative = cgroup.strip("/")
        for name in ("pids", "memory", "cpu"):
            if self.hierarchy.has(name):
                return self.hierarchy.root / name / relative / "cgroup.procs"
        return self.hierarchy.root / "pids" / relative / "cgroup.procs"

    def oom_files(self, cgroup: str) -> list[str]:
        return [str(self.hierarchy.root / "memory" / cgroup.strip("/") / "memory.oom_control")]

    def write(self, cgroup: str, files: dict[str, str], create: bool = True) -> None:
        """Write "controller/file" values (resources.file_values) into this cgroup (made first if `create`)."""
        relative = cgroup.strip("/")
        for name, value in files.items():
            controller, _, _ = name.partition("/")
            directory = self.hierarchy.root / controller / relative
            if create:
                directory.mkdir(parents=True, exist_ok=True)
            (self.hierarchy.root / controller / relative / name.split("/", 1)[1]).write_text(value)

    def create(self, cgroup: str, pid: int | None = None) -> None:
        for controller, directory in self.directories(cgroup).items():
            directory.mkdir(parents=True, exist_ok=True)
            if controller == "cpuset":
                _inherit_cpuset(self.hierarchy.root / "cpuset", directory)
            if pid is not None:
                (directory / "cgroup.procs").write_text(str(pid))

    def remove(self, cgroup: str) -> None:
        for directory in self.directories(cgroup).values():
            remove_tree(directory)



def _inherit_cpuset(root: Path, directory: Path) -> None:
    """A new v1 cpuset starts with no CPUs and no memory nodes, and a process
    cannot join it (ENOSPC): give each new level its parent's, as runc does."""
    levels = [directory, *directory.parents]
    chain = list(reversed(levels[: levels.index(root)])) if root in levels else [directory]
    for level in chain:
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (level / name).read_text().strip():
                (level / name).write_text((level.parent / name).read_text())
