"""Sessions over the rest of pyrio: containers from shimd, pod namespaces from netd."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from common.errors import FailedPrecondition
from services.crigw.gateway import Gateway
from services.crigw.streaming.attach import run_attach
from services.crigw.streaming.exec import ExecSession
from services.crigw.streaming.netns import dial_in_netns
from services.crigw.streaming.portforward import Dialer
from services.crigw.streaming.remotecommand import RemoteStreams, status_exit_code, status_success

# netd's sandbox states: only a ready sandbox has a network to forward into.
SANDBOX_READY = "ready"


def require_running(info: dict[str, Any], container_id: str) -> dict[str, Any]:
    if not info.get("running"):
        raise FailedPrecondition(f"container {container_id} is not running")
    return info


def require_ready(sandbox: dict[str, Any], sandbox_id: str) -> dict[str, Any]:
    if sandbox.get("state") != SANDBOX_READY:
        raise FailedPrecondition(f"pod sandbox {sandbox_id} is not ready (state {sandbox.get('state')!r})")
    return sandbox


class GatewayBackend:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # runc --pid-file of running execs: how a disconnect finds what to kill.
        self.pid_dir = Path(gateway.config.pyrio.run_dir) / "streaming"

    def exec_info(self, container_id: str) -> dict[str, Any]:
        info = self.gateway.shimd.call("container.exec_info", {"container_id": container_id}, idempotent=True)
        return require_running(info, container_id)

    def attach_info(self, container_id: str) -> dict[str, Any]:
        info = self.gateway.shimd.call("container.attach_info", {"container_id": container_id}, idempotent=True)
        return require_running(info, container_id)

    def sandbox(self, sandbox_id: str) -> dict[str, Any]:
        sandbox = self.gateway.netd.call("sandbox.status", {"sandbox_id": sandbox_id}, idempotent=True)
        return require_ready(sandbox, sandbox_id)

    def exec(self, request: dict[str, Any], streams: RemoteStreams, cancelled: threading.Event) -> dict[str, Any]:
        info = self.exec_info(request["container_id"])
        code = ExecSession(info, list(request["cmd"]), self.pid_dir).run(streams, cancelled)
        return status_success() if code == 0 else status_exit_code(code)

    def attach(self, request: dict[str, Any], streams: RemoteStreams, cancelled: threading.Event) -> dict[str, Any]:
        container_id = request["container_id"]
        info = self.attach_info(container_id)

        def resize(width: int, height: int) -> None:
            self.gateway.shimd.call("container.resize", {"container_id": container_id, "width": width, "height": height})

        run_attach(info, streams, cancelled, resize)
        return status_success()

    def port_dialer(self, request: dict[str, Any]) -> Dialer:
        sandbox = self.sandbox(request["pod_sandbox_id"])
        if (sandbox.get("namespace_options") or {}).get("network") == "NODE":
            # A host-network pod listens on the node's own localhost.
            return lambda port: dial_in_netns(None, port)
        netns = (sandbox.get("namespaces") or {}).get("network") or ""
        if not netns:
            raise FailedPrecondition(f"pod sandbox {request['pod_sandbox_id']} has no network namespace to forward into")
        return lambda port: dial_in_netns(netns, port)
