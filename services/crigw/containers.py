"""Container RPCs: CreateContainer, StartContainer, StopContainer,
RemoveContainer, ListContainers, ContainerStatus, ExecSync,
ReopenContainerLog, UpdateContainerResources.

shimd owns containers (and asks netd and imaged what it needs at create);
these handlers validate, convert, and set the deadline of each call.
"""

from __future__ import annotations

import json
from typing import Any

from cri_api.v1 import api_pb2

from common.errors import InvalidArgument
from common.exec_limits import MAX_EXEC_TIMEOUT_SECONDS, MAX_STOP_TIMEOUT_SECONDS, check_exec_command, clamp_timeout
from services.crigw.convert import dict_to_message, message_to_dict
from services.crigw.gateway import Gateway
from services.crigw.handlers import cri_handler
from services.crigw.list_cache import ListCache

# A create mounts the rootfs and waits for `runc create` (runtime.create_timeout).
CREATE_MARGIN_SECONDS = 60.0
# What a stop may take beyond its grace period: SIGKILL and the reaping.
STOP_MARGIN_SECONDS = 30.0
# ExecSync with timeout 0 has no timeout of its own; the call still ends.
EXEC_WITHOUT_TIMEOUT_SECONDS = 24 * 3600.0


def _timeout(gateway: Gateway, at_least: float) -> float:
    return max(gateway.config.pyrio.rpc_timeout, at_least)


@cri_handler("CreateContainer")
def create_container(gateway: Gateway, request: api_pb2.CreateContainerRequest) -> api_pb2.CreateContainerResponse:
    if not request.pod_sandbox_id:
        raise InvalidArgument("pod_sandbox_id must not be empty")
    if not request.HasField("config"):
        raise InvalidArgument("CreateContainer needs a container config")
    reply = gateway.shimd.call(
        "container.create",
        {
            "sandbox_id": request.pod_sandbox_id,
            "config": message_to_dict(request.config),
            "sandbox_config": message_to_dict(request.sandbox_config),
        },
        timeout=_timeout(gateway, gateway.config.runtime.create_timeout + CREATE_MARGIN_SECONDS),
    )
    return api_pb2.CreateContainerResponse(container_id=reply["container_id"])


@cri_handler("StartContainer")
def start_container(gateway: Gateway, request: api_pb2.StartContainerRequest) -> api_pb2.StartContainerResponse:
    gateway.shimd.call("container.start", {"container_id": request.container_id})
    return api_pb2.StartContainerResponse()


@cri_handler("StopContainer")
def stop_container(gateway: Gateway, request: api_pb2.StopContainerRequest) -> api_pb2.StopContainerResponse:
    timeout = clamp_timeout(request.timeout, MAX_STOP_TIMEOUT_SECONDS, "StopContainer timeout")
    gateway.shimd.call(
        "container.stop",
        {"container_id": request.container_id, "timeout": timeout},
        timeout=_timeout(gateway, timeout + STOP_MARGIN_SECONDS),
        idempotent=True,
    )
    return api_pb2.StopContainerResponse()


@cri_handler("RemoveContainer")
def remove_container(gateway: Gateway, request: api_pb2.RemoveContainerRequest) -> api_pb2.RemoveContainerResponse:
    gateway.shimd.call(
        "container.remove",
        {"container_id": request.container_id},
        timeout=_timeout(gateway, STOP_MARGIN_SECONDS * 2),
        idempotent=True,
    )
    return api_pb2.RemoveContainerResponse()


def container_filter(request: Any) -> dict[str, Any]:
    """shimd's filter from a ListContainers or ListContainerStats request."""
    if not request.HasField("filter"):
        return {}
    given = request.filter
    filter_: dict[str, Any] = {
        "id": given.id,
        "pod_sandbox_id": given.pod_sandbox_id,
        "label_selector": dict(given.label_selector),
    }
    if "state" in given.DESCRIPTOR.fields_by_name and given.HasField("state"):
        filter_["state"] = {"state": given.state.state}
    return filter_


def _encode_container(item: dict[str, Any], state: int) -> bytes:
    return dict_to_message({**item, "state": state}, api_pb2.Container).SerializeToString()


CONTAINER_LIST_CACHE = ListCache(_encode_container)


@cri_handler("ListContainers")
def list_containers(gateway: Gateway, request: api_pb2.ListContainersRequest) -> bytes:
    """The serialized ListContainersResponse (see services/crigw/list_cache.py)."""
    filter_ = container_filter(request)
    brief = gateway.shimd.call("container.list", {"filter": filter_, "brief": True}, idempotent=True)
    return CONTAINER_LIST_CACHE.response_bytes(
        brief,
        lambda ids: gateway.shimd.call("container.list", {"filter": {"ids": ids}}, idempotent=True),
        complete=not any(filter_.values()),
    )


@cri_handler("ContainerStatus")
def container_status(gateway: Gateway, request: api_pb2.ContainerStatusRequest) -> api_pb2.ContainerStatusResponse:
    status = gateway.shimd.call(
        "container.status", {"container_id": request.container_id, "verbose": request.verbose}, idempotent=True
    )
    info = status.pop("info", {}) or {}
    response = api_pb2.ContainerStatusResponse(status=dict_to_message(status, api_pb2.ContainerStatus))
    for key, value in info.items():
        response.info[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return response


@cri_handler("ExecSync")
def exec_sync(gateway: Gateway, request: api_pb2.ExecSyncRequest) -> api_pb2.ExecSyncResponse:
    command = check_exec_command(list(request.cmd), "ExecSync")
    timeout = clamp_timeout(request.timeout, MAX_EXEC_TIMEOUT_SECONDS, "ExecSync timeout")
    deadline = timeout + STOP_MARGIN_SECONDS if timeout else EXEC_WITHOUT_TIMEOUT_SECONDS
    reply = gateway.shimd.call(
        "container.exec_sync",
        {"container_id": request.container_id, "cmd": command, "timeout": timeout},
        timeout=_timeout(gateway, deadline),
    )
    return api_pb2.ExecSyncResponse(stdout=reply["stdout"], stderr=reply["stderr"], exit_code=reply["exit_code"])


@cri_handler("ReopenContainerLog")
def reopen_container_log(
    gateway: Gateway, request: api_pb2.ReopenContainerLogRequest
) -> api_pb2.ReopenContainerLogResponse:
    gateway.shimd.call("container.reopen_log", {"container_id": request.container_id}, idempotent=True)
    return api_pb2.ReopenContainerLogResponse()


@cri_handler("UpdateContainerResources")
def update_container_resources(
    gateway: Gateway, request: api_pb2.UpdateContainerResourcesRequest
) -> api_pb2.UpdateContainerResourcesResponse:
    gateway.shimd.call(
        "container.update_resources",
        {"container_id": request.container_id, "linux": message_to_dict(request.linux)},
        idempotent=True,
    )
    return api_pb2.UpdateContainerResourcesResponse()
