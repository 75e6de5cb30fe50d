"""Stats RPCs: ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats.

Container figures come from shimd (cgroup files and imaged's writable layer
usage); a pod's are the sum of its containers', because pyrio pods have no
process of their own to account for.
"""

from __future__ import annotations

import time
from typing import Any

from cri_api.v1 import api_pb2

from services.crigw.containers import container_filter
from services.crigw.convert import dict_to_message
from services.crigw.gateway import Gateway
from services.crigw.handlers import cri_handler


def _container_stats(items: list[dict[str, Any]]) -> list[api_pb2.ContainerStats]:
    return [dict_to_message(item, api_pb2.ContainerStats) for item in items]


@cri_handler("ContainerStats")
def container_stats(gateway: Gateway, request: api_pb2.ContainerStatsRequest) -> api_pb2.ContainerStatsResponse:
    item = gateway.shimd.call("container.stats", {"container_id": request.container_id}, idempotent=True)
    return api_pb2.ContainerStatsResponse(stats=dict_to_message(item, api_pb2.ContainerStats))


@cri_handler("ListContainerStats")
def list_container_stats(
    gateway: Gateway, request: api_pb2.ListContainerStatsRequest
) -> api_pb2.ListContainerStatsResponse:
    items = gateway.shimd.call("container.list_stats", {"filter": container_filter(request)}, idempotent=True)
    return api_pb2.ListContainerStatsResponse(stats=_container_stats(items))


def _sum(items: list[dict[str, Any]], section: str, field: str) -> int | None:
    values = [item[section][field]["value"] for item in items if field in item.get(section, {})]
    return sum(values) if values else None


def _pod_stats(sandbox: dict[str, Any], containers: list[dict[str, Any]],
               pod_cgroup: dict[str, Any] | None = None, pod_network: dict[str, Any] | None = None) -> api_pb2.PodSandboxStats:
    now = time.time_ns()
    linux: dict[str, Any] = {"containers": containers}
    cpu = _sum(containers, "cpu", "usage_core_nano_seconds")
    if cpu is not None:
        linux["cpu"] = {"timestamp": now, "usage_core_nano_seconds": {"value": cpu}}
    memory: dict[str, Any] = {}
    for field in ("working_set_bytes", "usage_bytes", "rss_bytes", "page_faults", "major_page_faults"):
        total = _sum(containers, "memory", field)
        if total is not None:
            memory[field] = {"value": total}
    if memory:
        linux["memory"] = {"timestamp": now, **memory}
    # A pod with a cgroup of its own: its figures (and its limit, in
    # available_bytes) are the pod cgroup's.
    for section in ("cpu", "memory"):
        if (pod_cgroup or {}).get(section):
            linux[section] = pod_cgroup[section]
    # netd reads the pod's own namespace; else (a host-network pod) what a
    # container's process sees.
    network = pod_network or next((item["pod_network"] for item in containers if "pod_network" in item), None)
    if network is not None:
        linux["network"] = network
    counts = [item["process_count"] for item in containers if "process_count" in item]
    if counts:
        linux["process"] = {"timestamp": now, "process_count": {"value": sum(counts)}}
    stats = {
        "attributes": {
            "id": sandbox["id"],
            "metadata": sandbox["metadata"],
            "labels": sandbox.get("labels") or {},
            "annotations": sandbox.get("annotations") or {},
        },
        "linux": linux,
    }
    return dict_to_message(stats, api_pb2.PodSandboxStats)


def _pod_cgroup_stats(gateway: Gateway, sandboxes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """sandbox id -> its own cgroup's figures, for those pods that have one (one call for all)."""
    if not sandboxes:
        return {}
    return gateway.shimd.call("sandbox.stats", {"sandboxes": [
        {"id": sandbox["id"], "cgroup_parent": sandbox.get("cgroup_parent", "")} for sandbox in sandboxes
    ]}, idempotent=True)


def _pod_networks(gateway: Gateway, sandbox_ids: list[str]) -> dict[str, dict[str, Any]]:
    """sandbox id -> NetworkUsage of its pinned network namespace (netd, one call for all)."""
    if not sandbox_ids:
        return {}
    return gateway.netd.call("sandbox.network_stats", {"sandbox_ids": sandbox_ids}, idempotent=True)


@cri_handler("PodSandboxStats")
def pod_sandbox_stats(gateway: Gateway, request: api_pb2.PodSandboxStatsRequest) -> api_pb2.PodSandboxStatsResponse:
    sandbox = gateway.netd.call("sandbox.status", {"sandbox_id": request.pod_sandbox_id}, idempotent=True)
    containers = gateway.shimd.call(
        "container.list_stats", {"filter": {"pod_sandbox_id": sandbox["id"]}}, idempotent=True
    )
    pod_cgroups = _pod_cgroup_stats(gateway, [sandbox])
    networks = _pod_networks(gateway, [sandbox["id"]])
    return api_pb2.PodSandboxStatsResponse(
        stats=_pod_stats(sandbox, containers, pod_cgroups.get(sandbox["id"]), networks.get(sandbox["id"]))
    )


@cri_handler("ListPodSandboxStats")
def list_pod_sandbox_stats(
    gateway: Gateway, request: api_pb2.ListPodSandboxStatsRequest
) -> api_pb2.ListPodSandboxStatsResponse:
    filter_: dict[str, Any] = {}
    if request.HasField("filter"):
        filter_ = {"id": request.filter.id, "label_selector": dict(request.filter.label_selector)}
    sandboxes = gateway.netd.call("sandbox.list", {"filter": filter_}, idempotent=True)
    containers = gateway.shimd.call("container.list_stats", {"filter": {}}, idempotent=True)
    by_sandbox: dict[str, list[dict[str, Any]]] = {}
    for item in containers:
        by_sandbox.setdefault(item.get("pod_sandbox_id", ""), []).append(item)
    ready = [sandbox for sandbox in sandboxes if sandbox.get("state") in ("ready", 0, "SANDBOX_READY")]
    pod_cgroups = _pod_cgroup_stats(gateway, ready)
    networks = _pod_networks(gateway, [sandbox["id"] for sandbox in ready])
    stats = [_pod_stats(sandbox, by_sandbox.get(sandbox["id"], []), pod_cgroups.get(sandbox["id"]),
                        networks.get(sandbox["id"])) for sandbox in ready]
    return api_pb2.ListPodSandboxStatsResponse(stats=stats)

