"""CRI NetworkUsage from the text of a network namespace's /proc/net/dev."""

from __future__ import annotations

import time
from typing import Any

DEFAULT_INTERFACE = "eth0"


def network_usage(net_dev: str) -> dict[str, Any] | None:
    """NetworkUsage {timestamp, default_interface, interfaces} of every
    interface but `lo` (as cadvisor counts a pod's network), None when the
    namespace has no other. The default interface is eth0, the one CNI
    plugins name for the kubelet, else the first listed."""
    interfaces = []
    for line in net_dev.splitlines()[2:]:
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
            # Not CRI fields: for the metrics (container_network_*_packets_total).
            "rx_packets": int(fields[1]),
            "tx_packets": int(fields[9]),
        })
    if not interfaces:
        return None
    default = next((item for item in interfaces if item["name"] == DEFAULT_INTERFACE), interfaces[0])
    return {"timestamp": time.time_ns(), "default_interface": default, "interfaces": interfaces}
