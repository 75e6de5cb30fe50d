"""A pod's network figures for CRI stats, read from /proc without entering its namespace."""

from __future__ import annotations

import time
from typing import Any


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
