"""netd: pod sandboxes (pinned namespaces, pod files) and their CNI networking.

RPC methods (see docs/ARCHITECTURE.md): sandbox.run, sandbox.stop,
sandbox.remove, sandbox.status, sandbox.list, sandbox.check, and health.
"""

from __future__ import annotations

from typing import Any

from common.config import Config
from common.errors import FailedPrecondition, InvalidArgument
from common.rpc import CallContext, RpcServer
from services.netd.cni_config import load_network
from services.netd.lifecycle import SandboxManager
from services.netd.network_stats import NetworkStats


def _sandbox_id(params: dict[str, Any]) -> str:
    sandbox_id = params.get("sandbox_id")
    if not isinstance(sandbox_id, str) or not sandbox_id:
        raise InvalidArgument("sandbox_id must be a non-empty string")
    return sandbox_id


class NetDaemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.sandboxes = SandboxManager(config)
        self.sandboxes.recover()
        self.network_stats = NetworkStats()

    def register(self, server: RpcServer) -> None:
        server.register("sandbox.run", self.run)
        server.register("sandbox.stop", self.stop)
        server.register("sandbox.remove", self.remove)
        server.register("sandbox.status", self.status)
        server.register("sandbox.list", self.list)
        server.register("sandbox.check", self.check)
        server.register("sandbox.network_stats", self.network_usage)

    def run(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        config = params.get("config")
        if not isinstance(config, dict):
            raise InvalidArgument("sandbox.run needs a PodSandboxConfig")
        return {"sandbox_id": self.sandboxes.run(config, str(params.get("runtime_handler") or ""))}

    def stop(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        self.network_stats.forget(_sandbox_id(params))
        self.sandboxes.stop(_sandbox_id(params))
        return {}

    def remove(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        self.network_stats.forget(_sandbox_id(params))
        self.sandboxes.remove(_sandbox_id(params))
        return {}

    def status(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        return self.sandboxes.status(_sandbox_id(params))

    def list(self, params: dict[str, Any], call: CallContext) -> list[Any]:
        if params.get("brief"):
            return self.sandboxes.brief(params.get("filter") or {})
        return self.sandboxes.list(params.get("filter") or {})

    def check(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        """CNI CHECK of the pod's attachment: {} when healthy, else the plugin's error."""
        self.sandboxes.check(_sandbox_id(params))
        return {}

    def network_usage(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        """sandbox id -> CRI NetworkUsage of its own network namespace, for
        the ready pods among `sandbox_ids` (all ready pods when absent);
        host-network pods have none of their own and are left out."""
        wanted = params.get("sandbox_ids")
        pinned = {
            record["id"]: record["namespaces"]["network"]
            for record in self.sandboxes.list({})
            if record.get("state") == "ready" and (record.get("namespaces") or {}).get("network")
        }
        return self.network_stats.usage(pinned, None if wanted is None else set(wanted))

    def health(self) -> dict[str, Any]:
        # Read the config dir on each ask: a conflist that appears or breaks is
        # reflected at the kubelet's next Status, without a restart.
        try:
            network = load_network(self.config)
        except FailedPrecondition as exc:
            return {"ready": True, "reason": "", "network_ready": False, "network_reason": str(exc)}
        return {"ready": True, "reason": "", "network_ready": True, "network_reason": "", "network": network.name}

    def close(self) -> None:
        self.network_stats.close()


def build(config: Config, server: RpcServer) -> NetDaemon:
    daemon = NetDaemon(config)
    daemon.register(server)
    return daemon
