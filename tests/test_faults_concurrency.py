"""Concurrency (issue 6): one pod's containers created, started and removed
in parallel; many pods at once; RemovePodSandbox racing CreateContainer in
that pod. One coherent outcome, and no leak.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from cri_api.v1 import api_pb2

from common.config import load_config
from common.daemon import client_for
from tests.fixtures_containers import CONTAINER_RUNNING, Containers
from tests.fixtures_faults import Patient, assert_no_leaks, wait_all_running

PARALLEL = 8


def test_one_pods_containers_in_parallel_and_many_pods_at_once(fault_containers: Containers, patient: Patient) -> None:
    containers = fault_containers
    pod = containers.pod()
    configs = [containers.config(f"c{index}", command=["sleep", "3600"]) for index in range(PARALLEL)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        ids = list(pool.map(lambda config: containers.create(pod, config), configs))
        assert len(set(ids)) == PARALLEL
        list(pool.map(containers.start, ids))
        listed = {item.id: item for item in patient.containers()}
        assert set(listed) == set(ids)
        assert all(item.state == CONTAINER_RUNNING for item in listed.values())
        pids = {patient.info(container_id)["pid"] for container_id in ids}
        assert len(pids) == PARALLEL
        list(pool.map(containers.remove, ids))
    assert patient.containers() == []

    # Many pods, each with a container, started and removed at once.
    def pod_with_container(index: int) -> str:
        own = containers.pod()
        containers.run(own, name="main", command=["sleep", "3600"])
        return own[0]

    with ThreadPoolExecutor(PARALLEL) as pool:
        sandbox_ids = list(pool.map(pod_with_container, range(PARALLEL)))
        assert {item.pod_sandbox_id for item in patient.containers()} == set(sandbox_ids)

        def remove_pod(sandbox_id: str) -> None:
            patient.stop_pod(sandbox_id)
            patient.remove_pod(sandbox_id)

        list(pool.map(remove_pod, sandbox_ids + [pod[0]]))
    assert patient.containers() == [] and patient.pods() == []
    assert_no_leaks(containers.stack)


def test_remove_pod_racing_create_container(fault_containers: Containers, patient: Patient) -> None:
    containers = fault_containers
    for round_number in range(4):
        pod = containers.pod()
        outcomes: list[Any] = []
        barrier = threading.Barrier(PARALLEL + 1)

        def create(index: int) -> None:
            config = containers.config(f"c{index}", command=["sleep", "3600"])
            request = api_pb2.CreateContainerRequest(pod_sandbox_id=pod[0], config=config, sandbox_config=pod[1])
            barrier.wait()
            try:
                outcomes.append(patient.once("CreateContainer", request, 60).container_id)
            except grpc.RpcError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=create, args=(index,)) for index in range(PARALLEL)]
        for thread in threads:
            thread.start()
        barrier.wait()
        if round_number % 2:
            patient.stop_pod(pod[0])
        patient.remove_pod(pod[0])
        for thread in threads:
            thread.join(60)
        # A create that lost the race failed with a clear status; one that won
        # made a container that the removal then took with the pod.
        for outcome in outcomes:
            if isinstance(outcome, grpc.RpcError):
                assert outcome.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), outcome
        assert len(outcomes) == PARALLEL
        assert patient.pods() == []
        assert patient.containers() == [], [(c.id, c.metadata.name, c.state) for c in patient.containers()]
    assert_no_leaks(containers.stack)


def test_a_closing_pod_stays_closed_to_creates_across_a_shimd_restart(fault_containers: Containers, patient: Patient) -> None:
    """Between shimd's remove_all and netd's remove of a pod, a create must be
    refused, even by a shimd restarted in that window."""
    containers = fault_containers
    stack = containers.stack
    pod = containers.pod()
    client = client_for(load_config(str(stack.config_path)), "shimd", timeout=30)
    try:
        client.call("container.remove_all", {"sandbox_id": pod[0]}, idempotent=True)
    finally:
        client.close()
    stack.supervisorctl("restart", "shimd")
    wait_all_running(stack)
    request = api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod[0], config=containers.config("late", command=["sleep", "60"]), sandbox_config=pod[1]
    )
    try:
        patient.call("CreateContainer", request, 60)
        raise AssertionError("a container was created in a pod being removed")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "being stopped or removed" in exc.details(), exc
    assert patient.containers() == []
    containers.cleanup()
    assert_no_leaks(stack)
