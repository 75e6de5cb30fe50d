"""The CRI gRPC server on the gateway's unix socket.

Method handlers come from the per-area modules through the HANDLERS
registry; every method of RuntimeService and ImageService that has none
answers UNIMPLEMENTED with its name.
"""

from __future__ import annotations

import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import grpc
from cri_api.v1 import api_pb2

from common.errors import Unimplemented
from services.crigw.gateway import Gateway
from services.crigw.handlers import HANDLERS, set_call
from services.crigw.request_limits import check_request_limits
from services.crigw.status import serve_cri_call

# The CRI areas, each one module of handlers (like CRI-O's server/ package).
HANDLER_MODULES = (
    "services.crigw.runtime_info",
    "services.crigw.images",
    "services.crigw.sandboxes",
    "services.crigw.containers",
    "services.crigw.stats",
    "services.crigw.events",
    "services.crigw.pod_metrics",
    "services.crigw.streaming",
)

CRI_SERVICES = ("runtime.v1.RuntimeService", "runtime.v1.ImageService")


def load_handler_modules() -> None:
    for module in HANDLER_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def _unimplemented(method: str) -> Callable[[Any, Any], Any]:
    def handler(_gateway: Any, _request: Any) -> Any:
        raise Unimplemented(f"{method} is not implemented by pyrio")

    return handler


class InFlightCalls:
    """Counts CRI calls being served, so a stopping gateway can let them finish."""

    def __init__(self) -> None:
        self._count = 0
        self.started_total = 0  # calls ever started: tells an idle gateway there was activity
        self._idle = threading.Condition()

    @property
    def busy(self) -> bool:
        return self._count > 0

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1
            self.started_total += 1

    def __exit__(self, *_exc: Any) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    @property
    def count(self) -> int:
        return self._count

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


IN_FLIGHT = InFlightCalls()


def _method_handler(gateway: Gateway, method: Any) -> grpc.RpcMethodHandler:
    name = method.name
    request_class = getattr(api_pb2, method.input_type.name)
    response_class = getattr(api_pb2, method.output_type.name)
    handler = HANDLERS.get(name, _unimplemented(name))

    def checked(request: Any, context: Any) -> Any:
        set_call(context)
        check_request_limits(request)
        return handler(gateway, request)

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        with IN_FLIGHT:
            return serve_cri_call(name, checked, request, context)

    def serialize(response: Any) -> bytes:
        # A handler may answer the response already serialized (list_cache.py).
        return response if isinstance(response, bytes) else response_class.SerializeToString(response)

    kwargs = dict(request_deserializer=request_class.FromString, response_serializer=serialize)
    if method.server_streaming:
        def stream(request: Any, context: grpc.ServicerContext) -> Any:
            with IN_FLIGHT:
                yield from serve_cri_call(name, checked, request, context)

        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(call, **kwargs)


def build_server(gateway: Gateway, max_workers: int = 32) -> grpc.Server:
    load_handler_modules()
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cri"))
    for service_name in CRI_SERVICES:
        descriptor = api_pb2.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[1]]
        handlers = {method.name: _method_handler(gateway, method) for method in descriptor.methods}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    socket_path = Path(gateway.config.pyrio.socket)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        socket_path.unlink()  # left by a previous gateway that was killed
    except FileNotFoundError:
        pass
    mode = int(gateway.config.pyrio.socket_mode, 8)
    # Create the socket with its final mode: no window in which it is wider.
    previous_umask = os.umask(0o777 & ~mode)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(previous_umask)
    os.chmod(socket_path, mode)
    return server
