"""CRI Exec, Attach and PortForward: validate, check the target, hand out a streaming URL."""

from __future__ import annotations

import logging
from typing import Any

from cri_api.v1 import api_pb2

from common.errors import InvalidArgument, Unavailable
from common.exec_limits import check_exec_command
from services.crigw.gateway import Gateway
from services.crigw.handlers import cri_handler
from services.crigw.streaming.backends import GatewayBackend
from services.crigw.streaming.exec import reap_orphaned_execs
from services.crigw.streaming.server import StreamingServer

log = logging.getLogger("pyrio.crigw.streaming")

_server: StreamingServer | None = None
_backend: GatewayBackend | None = None


def start_streaming_server(gateway: Gateway) -> StreamingServer:
    """Start the streaming server crigw hands URLs out for (one per process)."""
    global _server, _backend
    _backend = GatewayBackend(gateway)
    killed = reap_orphaned_execs(_backend.pid_dir)
    if killed:
        log.info("killed the exec sessions of a previous gateway", extra={"pids": killed})
    _server = StreamingServer(gateway.config.streaming, _backend).start()
    return _server


def _running() -> tuple[StreamingServer, GatewayBackend]:
    if _server is None or _backend is None:
        raise Unavailable("the streaming server is not running")
    return _server, _backend


def _validated_stdio(request: api_pb2.ExecRequest | api_pb2.AttachRequest) -> dict[str, Any]:
    """The request's container and stdio choices, checked as (and in the words of) the kubelet."""
    if not request.container_id:
        raise InvalidArgument("missing required container_id")
    if request.tty and request.stderr:
        raise InvalidArgument("tty and stderr cannot both be true")
    if not (request.stdin or request.stdout or request.stderr):
        raise InvalidArgument("one of stdin, stdout, or stderr must be set")
    return {
        "container_id": request.container_id,
        "tty": request.tty,
        "stdin": request.stdin,
        "stdout": request.stdout,
        "stderr": request.stderr,
    }


@cri_handler("Exec")
def exec_(gateway: Gateway, request: api_pb2.ExecRequest) -> api_pb2.ExecResponse:
    server, backend = _running()
    stored = _validated_stdio(request)
    if not request.cmd:
        raise InvalidArgument("cmd must name the command to run")
    command = check_exec_command(list(request.cmd), "Exec")
    backend.exec_info(request.container_id)
    stored["cmd"] = command
    return api_pb2.ExecResponse(url=server.url_for("exec", stored))


@cri_handler("Attach")
def attach(gateway: Gateway, request: api_pb2.AttachRequest) -> api_pb2.AttachResponse:
    server, backend = _running()
    stored = _validated_stdio(request)
    backend.attach_info(request.container_id)
    return api_pb2.AttachResponse(url=server.url_for("attach", stored))


@cri_handler("PortForward")
def port_forward(gateway: Gateway, request: api_pb2.PortForwardRequest) -> api_pb2.PortForwardResponse:
    server, backend = _running()
    if not request.pod_sandbox_id:
        raise InvalidArgument("missing required pod_sandbox_id")
    for port in request.port:
        if not 0 < port < 65536:
            raise InvalidArgument(f"port {port} is not between 1 and 65535")
    backend.port_dialer({"pod_sandbox_id": request.pod_sandbox_id})
    stored = {"pod_sandbox_id": request.pod_sandbox_id, "port": list(request.port)}
    return api_pb2.PortForwardResponse(url=server.url_for("portforward", stored))
