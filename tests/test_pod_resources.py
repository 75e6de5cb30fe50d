"""UpdatePodSandboxResources (the kubelet's in-place pod resize) through the
socket: the pod's own cgroup gets the limits, its files and PodSandboxStats
show them. The pods' cgroups are under the stack's private cgroup parent,
which the harness removes."""

from __future__ import annotations

import uuid

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_containers import Containers, container_cgroup_file

MiB = 1 << 20


def pod_parent(containers: Containers) -> str:
    parent = containers.stack.cgroup_parent
    if parent.endswith(".slice"):
        return f"{parent[:-len('.slice')]}-resize{uuid.uuid4().hex[:8]}.slice"
    return f"{parent.rstrip('/')}/pod-resize-{uuid.uuid4().hex[:8]}"


def update(containers: Containers, sandbox_id: str, resources: api_pb2.LinuxContainerResources,
           overhead: api_pb2.LinuxContainerResources | None = None) -> None:
    request = api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id=sandbox_id, resources=resources)
    if overhead is not None:
        request.overhead.CopyFrom(overhead)
    containers.runtime.UpdatePodSandboxResources(request, timeout=30)


def test_pod_resize_reaches_the_pod_cgroup_and_its_stats(containers: Containers) -> None:
    parent = pod_parent(containers)
    pod = containers.pod(cgroup_parent=parent)
    container_id = containers.run(pod, command=["sleep", "300"])
    memory_file = container_cgroup_file(parent, "memory/memory.limit_in_bytes", "memory.max")
    quota_file = container_cgroup_file(parent, "cpu/cpu.cfs_quota_us", "cpu.max")

    update(containers, pod[0], api_pb2.LinuxContainerResources(memory_limit_in_bytes=256 * MiB, cpu_period=100000,
                                                               cpu_quota=50000, cpu_shares=512),
           overhead=api_pb2.LinuxContainerResources(memory_limit_in_bytes=16 * MiB, cpu_quota=10000))
    assert int(memory_file.read_text()) == 272 * MiB  # the containers' sum plus the pod's overhead
    assert quota_file.read_text().split()[0] == "60000"
    stats = containers.runtime.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod[0]), timeout=20).stats
    memory = stats.linux.memory
    assert memory.available_bytes.value + memory.working_set_bytes.value == 272 * MiB
    assert [item.attributes.id for item in stats.linux.containers] == [container_id]

    # In place, the pod running on: a smaller pod.
    update(containers, pod[0], api_pb2.LinuxContainerResources(memory_limit_in_bytes=128 * MiB, cpu_period=100000,
                                                               cpu_quota=20000))
    assert int(memory_file.read_text()) == 128 * MiB
    assert quota_file.read_text().split()[0] == "20000"
    assert containers.status(container_id).status.state == api_pb2.CONTAINER_RUNNING
    listed = containers.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(
        filter=api_pb2.PodSandboxStatsFilter(id=pod[0])), timeout=20).stats
    assert len(listed) == 1
    assert listed[0].linux.memory.available_bytes.value + listed[0].linux.memory.working_set_bytes.value == 128 * MiB


def test_pod_resize_without_a_pod_cgroup_or_pod(containers: Containers) -> None:
    pod = containers.pod()  # no cgroup_parent: the node's shared parent
    with pytest.raises(grpc.RpcError) as caught:
        update(containers, pod[0], api_pb2.LinuxContainerResources(memory_limit_in_bytes=256 * MiB))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cgroup_parent" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        update(containers, "f" * 64, api_pb2.LinuxContainerResources(memory_limit_in_bytes=256 * MiB))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_pod_resize_with_invalid_resources(containers: Containers) -> None:
    pod = containers.pod(cgroup_parent=pod_parent(containers))
    with pytest.raises(grpc.RpcError) as caught:
        update(containers, pod[0], api_pb2.LinuxContainerResources(memory_limit_in_bytes=1024))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "memory_limit_in_bytes" in caught.value.details()
