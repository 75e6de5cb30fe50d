"""netd: pod sandboxes (pinned namespaces, pod files) and their CNI networking."""

from __future__ import annotations

from typing import Any

from common.config import Config
from common.errors import FailedPrecondition
from common.rpc import RpcServer
from services.netd.cni_config import load_network


class NetDaemon:
    def __init__(self, config: Config) -> None:
        self.config = config

    def health(self) -> dict[str, Any]:
        # Read the config dir on each ask: a conflist that appears or breaks is
        # reflected at the kubelet's next Status, without a restart.
        try:
            network = load_network(self.config)
        except FailedPrecondition as exc:
            return {"ready": True, "reason": "", "network_ready": False, "network_reason": str(exc)}
        return {"ready": True, "reason": "", "network_ready": True, "network_reason": "", "network": network.name}

    def close(self) -> None:
        pass


def build(config: Config, server: RpcServer) -> NetDaemon:
    return NetDaemon(config)
