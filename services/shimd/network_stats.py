"""A pod's network figures for CRI stats, read from /proc without entering its namespace."""

from __future__ import annotations

from typing import Any

from common.net_dev import network_usage as usage_of


def network_usage(pid: int) -> dict[str, Any] | None:
    """CRI NetworkUsage of the network namespace a process is in (its pod's),
    from /proc/PID/net/dev: no need to enter the namespace."""
    try:
        with open(f"/proc/{pid}/net/dev") as handle:
            return usage_of(handle.read())
    except OSError:
        return None
