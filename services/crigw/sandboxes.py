"""Pod sandbox RPCs: RunPodSandbox, StopPodSandbox, RemovePodSandbox,
PodSandboxStatus, ListPodSandbox.

netd owns sandboxes (namespaces, pod files, CNI); shimd owns their
containers. Stop and Remove reach shimd first so no container outlives the
network or namespaces it runs in.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cri_api.v1 import api_pb2

from common.errors import NotFound
from services.crigw import events
from services.crigw.convert import dict_to_message, message_to_dict
from services.crigw.gateway import Gateway
from services.crigw.handlers import cri_handler
from services.crigw.list_cache import ListCache

# CNI plugins may take a while (the kubelet allows RunPodSandbox minutes).
RUN_TIMEOUT_SECONDS = 240.0
# StopPodSandbox must forcibly stop what is left: the kubelet stopped the
# containers gracefully before calling it (containerd also uses 0).
CONTAINER_STOP_TIMEOUT_SECONDS = 0
SHIM_CALL_TIMEOUT_SECONDS = 120.0

STATE_NAMES = {"ready": "SANDBOX_READY", "notready": "SANDBOX_NOTREADY"}
STATE_BY_ENUM = {api_pb2.SANDBOX_READY: "ready", api_pb2.SANDBOX_NOTREADY: "notready"}


def _rpc_timeout(gateway: Gateway, at_least: float) -> float:
    return max(gateway.config.pyrio.rpc_timeout, at_least)


def _full_id(gateway: Gateway, given_id: str) -> str | None:
    """The full id of a sandbox (ids are accepted by unique prefix), None if unknown."""
    try:
        return gateway.netd.call("sandbox.status", {"sandbox_id": given_id}, idempotent=True)["id"]
    except NotFound:
        return None


def _sandbox_dict(record: dict[str, Any]) -> dict[str, Any]:
    """The fields PodSandbox and PodSandboxStatus share."""
    return {
        "id": record["id"],
        "metadata": record["metadata"],
        "state": STATE_NAMES.get(record["state"], "SANDBOX_NOTREADY"),
        "created_at": record["created_at"],
        "labels": record.get("labels") or {},
        "annotations": record.get("annotations") or {},
        "runtime_handler": record.get("runtime_handler", ""),
    }


@cri_handler("RunPodSandbox")
def run_pod_sandbox(gateway: Gateway, request: api_pb2.RunPodSandboxRequest) -> api_pb2.RunPodSandboxResponse:
    reply = gateway.netd.call(
        "sandbox.run",
        {"config": message_to_dict(request.config), "runtime_handler": request.runtime_handler},
        timeout=_rpc_timeout(gateway, RUN_TIMEOUT_SECONDS),
    )
    events.publish_sandbox_event(gateway, "CREATED", reply["sandbox_id"])
    events.publish_sandbox_event(gateway, "STARTED", reply["sandbox_id"])
    return api_pb2.RunPodSandboxResponse(pod_sandbox_id=reply["sandbox_id"])


@cri_handler("StopPodSandbox")
def stop_pod_sandbox(gateway: Gateway, request: api_pb2.StopPodSandboxRequest) -> api_pb2.StopPodSandboxResponse:
    sandbox_id = _full_id(gateway, request.pod_sandbox_id)
    if sandbox_id is None:
        # CRI: Stop is idempotent and must not fail once everything is reclaimed.
        return api_pb2.StopPodSandboxResponse()
    gateway.shimd.call(
        "container.stop_all",
        {"sandbox_id": sandbox_id, "timeout": CONTAINER_STOP_TIMEOUT_SECONDS},
        timeout=SHIM_CALL_TIMEOUT_SECONDS,
        idempotent=True,
    )
    gateway.netd.call("sandbox.stop", {"sandbox_id": sandbox_id}, timeout=_rpc_timeout(gateway, RUN_TIMEOUT_SECONDS), idempotent=True)
    events.publish_sandbox_event(gateway, "STOPPED", sandbox_id)
    return api_pb2.StopPodSandboxResponse()


@cri_handler("RemovePodSandbox")
def remove_pod_sandbox(
    gateway: Gateway, request: api_pb2.RemovePodSandboxRequest
) -> api_pb2.RemovePodSandboxResponse:
    sandbox_id = _full_id(gateway, request.pod_sandbox_id)
    if sandbox_id is None:
        return api_pb2.RemovePodSandboxResponse()  # already removed
    last_status = None
    if events.wants_sandbox_events(gateway):
        # Taken now: after the removal netd no longer knows the pod.
        last_status = sandbox_status_message(
            gateway.netd.call("sandbox.status", {"sandbox_id": sandbox_id}, idempotent=True))
        events.remember_sandbox(gateway, last_status)
    gateway.shimd.call(
        "container.remove_all", {"sandbox_id": sandbox_id}, timeout=SHIM_CALL_TIMEOUT_SECONDS, idempotent=True
    )
    gateway.netd.call(
        "sandbox.remove", {"sandbox_id": sandbox_id}, timeout=_rpc_timeout(gateway, RUN_TIMEOUT_SECONDS), idempotent=True
    )
    events.publish_sandbox_event(gateway, "DELETED", sandbox_id, last_status)
    return api_pb2.RemovePodSandboxResponse()


def sandbox_status_message(record: dict[str, Any]) -> api_pb2.PodSandboxStatus:
    """PodSandboxStatus of a netd sandbox record."""
    status = _sandbox_dict(record)
    status["network"] = {
        "ip": record["network"].get("ip", ""),
        "additional_ips": [{"ip": ip} for ip in record["network"].get("additional_ips", [])],
    }
    status["linux"] = {"namespaces": {"options": dict(record["namespace_options"])}}
    if record.get("userns"):
        status["linux"]["namespaces"]["options"]["userns_options"] = {"mode": "POD", **record["userns"]}
    return dict_to_message(status, api_pb2.PodSandboxStatus)


@cri_handler("PodSandboxStatus")
def pod_sandbox_status(
    gateway: Gateway, request: api_pb2.PodSandboxStatusRequest
) -> api_pb2.PodSandboxStatusResponse:
    record = gateway.netd.call("sandbox.status", {"sandbox_id": request.pod_sandbox_id}, idempotent=True)
    # With a timestamp set, the kubelet's Evented PLEG takes the pod's
    # container statuses from here instead of asking for each (CRI-O does the same).
    response = api_pb2.PodSandboxStatusResponse(
        status=sandbox_status_message(record),
        containers_statuses=events.container_status_messages(gateway, record["id"]),
        timestamp=time.time_ns(),
    )
    if request.verbose:
        # As CRI-O: one "info" entry holding the runtime's own view as JSON.
        response.info["info"] = json.dumps(record, sort_keys=True)
    return response


def _encode_sandbox(record: dict[str, Any], state: str) -> bytes:
    return dict_to_message(_sandbox_dict({**record, "state": state}), api_pb2.PodSandbox).SerializeToString()


SANDBOX_LIST_CACHE = ListCache(_encode_sandbox)


@cri_handler("ListPodSandbox")
def list_pod_sandbox(gateway: Gateway, request: api_pb2.ListPodSandboxRequest) -> bytes:
    """The serialized ListPodSandboxResponse (see services/crigw/list_cache.py)."""
    filter_: dict[str, Any] = {}
    if request.HasField("filter"):
        filter_["id"] = request.filter.id
        if request.filter.HasField("state"):
            filter_["state"] = STATE_BY_ENUM.get(request.filter.state.state, "?")
        filter_["label_selector"] = dict(request.filter.label_selector)
    brief = gateway.netd.call("sandbox.list", {"filter": filter_, "brief": True}, idempotent=True)
    return SANDBOX_LIST_CACHE.response_bytes(
        brief,
        lambda ids: gateway.netd.call("sandbox.list", {"filter": {"ids": ids}}, idempotent=True),
        complete=not any(filter_.values()),
    )


@cri_handler("UpdatePodSandboxResources")
def update_pod_sandbox_resources(
    gateway: Gateway, request: api_pb2.UpdatePodSandboxResourcesRequest
) -> api_pb2.UpdatePodSandboxResourcesResponse:
    # shimd writes them into the pod's own cgroup (its linux.cgroup_parent).
    gateway.shimd.call(
        "sandbox.update_resources",
        {"sandbox_id": request.pod_sandbox_id, "resources": message_to_dict(request.resources),
         "overhead": message_to_dict(request.overhead)},
        idempotent=True,
    )
    return api_pb2.UpdatePodSandboxResourcesResponse()
