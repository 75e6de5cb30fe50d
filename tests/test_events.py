"""GetContainerEvents (Evented PLEG) through the CRI socket: what events
arrive for a container's life, with which statuses; a reader that does not
keep up is cut off; a restart of shimd or crigw ends the stream UNAVAILABLE
(the kubelet then relists) rather than losing events silently."""

from __future__ import annotations

from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_containers import CONTAINER_EXITED, Containers, TestImages
from tests.fixtures_events import EventReader
from tests.fixtures_faults import kill_service, wait_all_running, wait_restarted
from tests.harness import Stack


@pytest.fixture
def readers() -> Iterator[list[EventReader]]:
    opened: list[EventReader] = []
    try:
        yield opened
    finally:
        for reader in opened:
            reader.close()


def open_reader(stack: Stack, readers: list[EventReader], read: bool = True) -> EventReader:
    reader = EventReader(stack, read=read)
    readers.append(reader)
    reader.wait_subscribed()
    return reader


def test_a_container_life_arrives_as_events_with_statuses(containers: Containers, readers: list[EventReader]) -> None:
    first, second = open_reader(containers.stack, readers), open_reader(containers.stack, readers)
    pod = containers.pod()
    sandbox_id, pod_config = pod
    container_id = containers.create(pod, containers.config("main", command=["sh", "-c", "sleep 0.3; exit 3"]))
    containers.start(container_id)
    containers.wait_exited(container_id)
    first.wait_for(lambda r: "STOPPED" in r.names_of(container_id), what="STOPPED event")
    containers.remove(container_id)

    for reader in (first, second):
        reader.wait_for(lambda r: "DELETED" in r.names_of(container_id), what="DELETED event")
        assert reader.names_of(container_id) == ["CREATED", "STARTED", "STOPPED", "DELETED"]
        assert reader.names_of(sandbox_id)[:2] == ["CREATED", "STARTED"]
        events = reader.of(container_id)
        for event in events:
            assert event.pod_sandbox_status.id == sandbox_id
            assert event.pod_sandbox_status.metadata.name == pod_config.metadata.name
            assert event.pod_sandbox_status.metadata.uid == pod_config.metadata.uid
            assert event.created_at > 0
        assert [event.created_at for event in events] == sorted(event.created_at for event in events)
        created, started, stopped, deleted = events
        assert [status.id for status in created.containers_statuses] == [container_id]
        assert created.containers_statuses[0].metadata.name == "main"
        assert started.containers_statuses[0].started_at > 0
        exited = stopped.containers_statuses[0]
        assert exited.state == CONTAINER_EXITED and exited.exit_code == 3 and exited.finished_at > 0
        assert stopped.created_at >= exited.finished_at
        assert list(deleted.containers_statuses) == []  # the pod has no container left


def test_pod_sandbox_status_carries_its_containers_statuses(containers: Containers) -> None:
    pod = containers.pod()
    container_id = containers.run(pod, command=["sleep", "60"])
    reply = containers.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod[0]), timeout=10)
    assert reply.timestamp > 0
    assert [status.id for status in reply.containers_statuses] == [container_id]
    assert reply.containers_statuses[0].state == api_pb2.CONTAINER_RUNNING


def test_sandbox_stop_and_remove_are_events(containers: Containers, readers: list[EventReader]) -> None:
    reader = open_reader(containers.stack, readers)
    sandbox_id, _ = containers.pod()
    containers.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
    containers.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
    reader.wait_for(lambda r: "DELETED" in r.names_of(sandbox_id), what="the pod's DELETED event")
    assert reader.names_of(sandbox_id) == ["CREATED", "STARTED", "STOPPED", "DELETED"]
    stopped = reader.of(sandbox_id)[2]
    assert stopped.pod_sandbox_status.state == api_pb2.SANDBOX_NOTREADY
    assert reader.of(sandbox_id)[3].pod_sandbox_status.id == sandbox_id


# --- slow readers and restarts (private stacks) ------------------------------

@pytest.fixture
def small_queue_stack() -> Iterator[Stack]:
    own = Stack({"events": {"subscriber_queue": 2}})
    try:
        own.start()
        yield own
    finally:
        own.stop()


def test_a_reader_that_falls_behind_is_cut_off_and_others_go_on(
    small_queue_stack: Stack, test_images: TestImages, readers: list[EventReader]
) -> None:
    containers = Containers(small_queue_stack, test_images)
    try:
        stalled = open_reader(small_queue_stack, readers, read=False)
        prompt = open_reader(small_queue_stack, readers)
        pod = containers.pod()
        # Big annotations make big events: the stalled stream's transport
        # buffers fill after a few, then its queue.
        ids = [containers.create(pod, containers.config(f"c{index}", annotations={"pad": "x" * 60000}))
               for index in range(8)]
        prompt.wait_for(lambda r: all(r.names_of(cid) == ["CREATED"] for cid in ids), what="every CREATED event")
        stalled.resume()
        assert stalled.wait_ended() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cut off" in stalled.details and "subscriber_queue" in stalled.details
        assert len(stalled.events) < len(prompt.events)
        assert prompt.code is None  # still open
    finally:
        containers.cleanup()


def test_killing_shimd_or_crigw_ends_streams_unavailable(
    fault_containers: Containers, readers: list[EventReader]
) -> None:
    stack = fault_containers.stack
    reader = open_reader(stack, readers)
    old = kill_service(stack, "shimd")
    assert reader.wait_ended() == grpc.StatusCode.UNAVAILABLE
    assert "shimd" in reader.details and "relist" in reader.details
    wait_restarted(stack, "shimd", old)
    wait_all_running(stack)

    # A new stream after the restart gets the events again.
    reader = open_reader(stack, readers)
    pod = fault_containers.pod()
    container_id = fault_containers.create(pod, fault_containers.config("main", command=["true"]))
    reader.wait_for(lambda r: r.names_of(container_id) == ["CREATED"], what="CREATED after a shimd restart")

    kill_service(stack, "crigw")
    assert reader.wait_ended() == grpc.StatusCode.UNAVAILABLE
