"""Process trees, memory (PSS) and CPU time from /proc, for the benchmarks.

Other stacks run on the same machine, so a runtime's processes are found by
their tree (descendants of a daemon's PID, or of processes whose command line
names the runtime's private root), never by their name.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Iterable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rollup_kib(pid: int, field: str = "Pss") -> int:
    """A field of /proc/PID/smaps_rollup in KiB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    return rollup_kib(pid, "Pss")


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def parent_pid(pid: int) -> int:
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (its own, not its reaped children's)."""
    try:
        fields = _stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(item) for item in handle.read().split()]
    except OSError:
        return []


def descendants(roots: Iterable[int]) -> set[int]:
    """The roots and every process below them."""
    found: set[int] = set()
    pending = [pid for pid in roots if pid]
    while pending:
        pid = pending.pop()
        if pid in found:
            continue
        found.add(pid)
        pending.extend(children_of(pid))
    return found


def total_pss_kib(pids: Iterable[int]) -> int:
    return sum(pss_kib(pid) for pid in pids)


def total_cpu_seconds(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


class PeakRss(threading.Thread):
    """Samples one process's RSS until stopped; `peak` is the highest seen, in bytes."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = rss_bytes(pid)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopped.set()
        self.join()
