"""Small readers of cgroup files shared by the v1 and v2 layouts."""

from __future__ import annotations

from pathlib import Path


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed file ("key value" lines: cpu.stat, memory.stat, memory.events)."""
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                values[key] = int(value)
    except OSError:
        pass
    return values


def memory_usage(now: int, usage: int, inactive_file: int, rss: int | None, faults: int | None,
                 major_faults: int | None, limit: int | None) -> dict:
    """CRI MemoryUsage from the figures both hierarchies have."""
    working_set = max(0, usage - inactive_file)
    memory: dict = {
        "timestamp": now,
        # The kubelet's working set: usage minus what the kernel can drop at once.
        "working_set_bytes": {"value": working_set},
        "usage_bytes": {"value": usage},
    }
    if limit is not None:
        memory["available_bytes"] = {"value": max(0, limit - working_set)}
    if rss is not None:
        memory["rss_bytes"] = {"value": rss}
    if faults is not None:
        memory["page_faults"] = {"value": faults}
    if major_faults is not None:
        memory["major_page_faults"] = {"value": major_faults}
    return memory


def remove_tree(directory: Path) -> None:
    """rmdir a cgroup and its children, deepest first (a cgroup with processes stays)."""
    if not directory.is_dir():
        return
    children = sorted((path for path in directory.rglob("*") if path.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for path in [*children, directory]:
        try:
            path.rmdir()
        except OSError:
            pass
