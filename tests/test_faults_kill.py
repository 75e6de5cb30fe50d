"""kill -9 of a service in the middle of its most complex operation (issue 6).

The outcome must be the finished object or nothing visible, and whatever
was half-made is cleaned up automatically once the service is back.
imaged mid-PullImage is tests/test_images_faults.py, netd mid-CNI ADD is
tests/test_network_faults.py; here: shimd and crigw mid-CreateContainer
and shimd mid-RemoveContainer (on a runtime whose `create` and `delete`
linger), netd killed at a sweep of points of RunPodSandbox, and removals
while imaged is down.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2

from tests import fixtures_containers
from tests.fixtures_containers import CONTAINER_CREATED, CONTAINER_RUNNING, Containers
from tests.fixtures_faults import (
    SLOW_SECONDS,
    Patient,
    SlowRuntimeStack,
    assert_no_leaks,
    kill_service,
    wait_all_running,
    wait_restarted,
)
from tests.fixtures_pods import pod_config
from tests.harness import Stack, leak_report, wait_until


def create_in_background(patient: Patient, pod: tuple[str, api_pb2.PodSandboxConfig], config: api_pb2.ContainerConfig) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def create() -> None:
        request = api_pb2.CreateContainerRequest(pod_sandbox_id=pod[0], config=config, sandbox_config=pod[1])
        started = time.monotonic()
        try:
            outcome["id"] = patient.once("CreateContainer", request, 60).container_id
        except grpc.RpcError as exc:
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=create)
    thread.start()
    return thread, outcome


def call_while_killing(stack: Stack, patient: Patient, service: str, delay: float, method: str, request: Any) -> dict[str, Any]:
    """Make one call, SIGKILL `service` `delay` seconds into it, and wait for
    the call to end and the service to be back: {"reply": ...} or {"error": RpcError}."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["reply"] = patient.once(method, request, 60)
        except grpc.RpcError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(delay)
    old = kill_service(stack, service)
    thread.join(60)
    assert not thread.is_alive()
    wait_restarted(stack, service, old)
    wait_all_running(stack)
    return outcome


def containers_of(patient: Patient, sandbox_id: str) -> list[api_pb2.Container]:
    return [item for item in patient.containers() if item.pod_sandbox_id == sandbox_id]


def setup(stack: SlowRuntimeStack, test_images: fixtures_containers.TestImages) -> tuple[Containers, Patient]:
    containers = Containers(stack, test_images)
    containers.pull(test_images.busybox.reference)
    return containers, Patient(stack)


def kill_mid_create(
    stack: SlowRuntimeStack, containers: Containers, patient: Patient, service: str
) -> tuple[tuple[str, api_pb2.PodSandboxConfig], api_pb2.ContainerConfig]:
    """CreateContainer on the slow runtime, SIGKILL `service` while the
    runtime's create runs: the call fails UNAVAILABLE at once, never hangs."""
    pod = containers.pod(runtime_handler="slow")
    config = containers.config("main", command=["sleep", "3600"])
    thread, outcome = create_in_background(patient, pod, config)
    wait_until(lambda: stack.runtime_started("create"), 30, interval=0.02, what="runtime create in progress")
    old = kill_service(stack, service)
    thread.join(30)
    assert not thread.is_alive(), f"CreateContainer hung after {service} died"
    assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE, outcome
    assert outcome["elapsed"] < 10
    wait_restarted(stack, service, old)
    wait_all_running(stack)
    return pod, config


def test_shimd_killed_mid_create_leaves_nothing(slow_runtime_stack: SlowRuntimeStack, test_images: fixtures_containers.TestImages) -> None:
    stack = slow_runtime_stack
    containers, patient = setup(stack, test_images)
    try:
        pod, config = kill_mid_create(stack, containers, patient, "shimd")
        # Never a half-made container: nothing, at any time after the restart,
        # even once the lingering `runtime create` has finished.
        deadline = time.monotonic() + SLOW_SECONDS + 5
        while time.monotonic() < deadline:
            assert containers_of(patient, pod[0]) == []
            time.sleep(0.2)
        assert_no_leaks_but_pod(stack)
        # The name is free: the same container is created and runs.
        container_id = containers.create(pod, config)
        containers.start(container_id)
        assert patient.status(container_id).state == CONTAINER_RUNNING
        containers.cleanup()
        assert_no_leaks(stack)
    finally:
        containers.cleanup()
        patient.close()


def test_crigw_killed_mid_create_gives_the_finished_container(slow_runtime_stack: SlowRuntimeStack, test_images: fixtures_containers.TestImages) -> None:
    stack = slow_runtime_stack
    containers, patient = setup(stack, test_images)
    try:
        pod, _ = kill_mid_create(stack, containers, patient, "crigw")
        # shimd finished the create: the container appears complete (never
        # half-made), and works.
        found = wait_until(lambda: containers_of(patient, pod[0]), SLOW_SECONDS + 20, what="the container listed")
        assert len(found) == 1 and found[0].state == CONTAINER_CREATED
        containers.container_ids.append(found[0].id)
        containers.start(found[0].id)
        assert patient.status(found[0].id).state == CONTAINER_RUNNING
        containers.cleanup()
        assert_no_leaks(stack)
    finally:
        containers.cleanup()
        patient.close()


def test_shimd_killed_mid_remove_finishes_the_removal(slow_runtime_stack: SlowRuntimeStack, test_images: fixtures_containers.TestImages) -> None:
    """RemoveContainer is idempotent: the gateway sends it again to the
    restarted shimd (or the restart finishes it); either way the container
    is gone and nothing of it is left."""
    stack = slow_runtime_stack
    containers, patient = setup(stack, test_images)
    try:
        pod = containers.pod(runtime_handler="slow")
        container_id = containers.run(pod, name="main", command=["sleep", "3600"])
        pid = patient.info(container_id)["pid"]
        outcome: dict[str, Any] = {}

        def remove() -> None:
            try:
                patient.once("RemoveContainer", api_pb2.RemoveContainerRequest(container_id=container_id), 60)
                outcome["code"] = "OK"
            except grpc.RpcError as exc:
                outcome["code"] = exc.code().name

        thread = threading.Thread(target=remove)
        thread.start()
        wait_until(lambda: stack.runtime_started("delete"), 30, interval=0.02, what="runtime delete in progress")
        old = kill_service(stack, "shimd")
        thread.join(60)
        assert not thread.is_alive(), "RemoveContainer hung after shimd died"
        assert outcome["code"] in ("OK", "UNAVAILABLE"), outcome
        wait_restarted(stack, "shimd", old)
        wait_all_running(stack)
        wait_until(lambda: containers_of(patient, pod[0]) == [], 10, what="the container gone")
        container_dirs = stack.state_dir / "shimd" / "containers"
        wait_until(lambda: not list(container_dirs.iterdir()), SLOW_SECONDS * 3 + 10, what="the removal finished")
        patient.remove(container_id)  # and removing it again is fine
        assert not Path(f"/proc/{pid}").exists()
        assert_no_leaks_but_pod(stack)
        containers.cleanup()
        assert_no_leaks(stack)
    finally:
        containers.cleanup()
        patient.close()


def assert_no_leaks_but_pod(stack: Stack) -> None:
    """Nothing of a container is left: no runtime container, no container
    process or shim, no rootfs mount (the pod's own pins and shm stay)."""
    report = leak_report(stack)
    assert report["runtime_containers"] == [] and report["processes"] == [], report
    rootfs_mounts = [point for point in report["mounts"] if "/rootfs/" in point]
    assert rootfs_mounts == [], report
    shim_dirs = list((stack.state_dir / "shimd" / "containers").iterdir())
    assert shim_dirs == [], shim_dirs
    assert list((stack.run_dir / "shims").iterdir()) == []


def test_netd_killed_at_any_point_of_run_pod_sandbox(fresh_stack: Stack, patient: Patient) -> None:
    """A sweep of kill points through RunPodSandbox: each outcome is a ready
    pod or no pod, and at the end nothing is left."""
    stack = fresh_stack
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.35):
        config = pod_config(pid_mode=api_pb2.POD)
        outcome = call_while_killing(stack, patient, "netd", delay, "RunPodSandbox", api_pb2.RunPodSandboxRequest(config=config))
        pods = [item for item in patient.pods() if item.metadata.uid == config.metadata.uid]
        if "reply" in outcome:
            assert [item.id for item in pods] == [outcome["reply"].pod_sandbox_id]
            assert pods[0].state == api_pb2.SANDBOX_READY
        else:
            assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
            assert len(pods) <= 1
            assert all(item.state == api_pb2.SANDBOX_READY for item in pods)
        for item in pods:
            patient.stop_pod(item.id)
            patient.remove_pod(item.id)
        assert_no_leaks(stack)


def test_imaged_killed_at_any_point_of_create_container(fault_containers: Containers, patient: Patient) -> None:
    """A sweep of kill points of imaged through CreateContainer (its
    rootfs.prepare: the overlay mount and the image's config): each outcome is
    a created container, or UNAVAILABLE and no container listed, after which
    the kubelet's retry with the same name works. (shimd resends the
    idempotent rootfs.prepare to the restarted imaged, so in practice every
    create here succeeds.) At the end nothing is left: no rootfs mount, no
    rootfs directory, no record."""
    containers = fault_containers
    stack = containers.stack
    pod = containers.pod()
    for index, delay in enumerate((0.0, 0.003, 0.006, 0.01, 0.015, 0.02, 0.03, 0.05)):
        name = f"c{index}"
        request = api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod[0], config=containers.config(name, command=["sleep", "3600"]), sandbox_config=pod[1]
        )
        outcome = call_while_killing(stack, patient, "imaged", delay, "CreateContainer", request)
        listed = [item for item in containers_of(patient, pod[0]) if item.metadata.name == name]
        if "reply" in outcome:
            container_id = outcome["reply"].container_id
            assert [item.id for item in listed] == [container_id] and listed[0].state == CONTAINER_CREATED
        else:
            assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE, outcome["error"]
            assert listed == []
            container_id = patient.once("CreateContainer", request, 60).container_id
        patient.start(container_id)
        assert patient.status(container_id).state == CONTAINER_RUNNING
        patient.stop(container_id)
        patient.remove(container_id)
    container_dirs = stack.state_dir / "shimd" / "containers"
    wait_until(lambda: not list(container_dirs.iterdir()), 30, what="shimd to finish the removals")
    assert_no_leaks_but_pod(stack)
    rootfs_dirs = [path for sub in ("rootfs", "containers") if (stack.state_dir / "imaged" / sub).is_dir()
                   for path in (stack.state_dir / "imaged" / sub).iterdir()]
    assert rootfs_dirs == []
    containers.cleanup()
    assert_no_leaks(stack)


def test_removals_while_imaged_is_down_finish_once_it_is_back(fault_containers: Containers, patient: Patient) -> None:
    """A RemoveContainer (or a failed CreateContainer) that cannot release the
    root filesystem because imaged is down answers UNAVAILABLE; the container
    is no longer listed, and shimd finishes the removal by itself once imaged
    is back, without a restart of its own."""
    containers = fault_containers
    stack = containers.stack
    pod = containers.pod()
    container_id = containers.run(pod, name="main", command=["sleep", "3600"])
    shimd_pid = stack.service_pid("shimd")
    stack.supervisorctl("stop", "imaged")
    try:
        request = api_pb2.RemoveContainerRequest(container_id=container_id)
        started = time.monotonic()
        try:
            patient.once("RemoveContainer", request, 30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        assert time.monotonic() - started < 10
        failed_create = api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod[0], config=containers.config("other", command=["sleep", "3600"]), sandbox_config=pod[1]
        )
        try:
            patient.once("CreateContainer", failed_create, 30)
            raise AssertionError("CreateContainer worked without imaged")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        assert containers_of(patient, pod[0]) == []
    finally:
        stack.supervisorctl("start", "imaged")
    wait_all_running(stack)
    container_dirs = stack.state_dir / "shimd" / "containers"
    wait_until(lambda: not list(container_dirs.iterdir()), 30, what="shimd to finish the removals")
    assert stack.service_pid("shimd") == shimd_pid
    assert_no_leaks_but_pod(stack)
    containers.cleanup()
    assert_no_leaks(stack)


def test_start_whose_record_was_lost_is_adopted(fault_containers: Containers, patient: Patient) -> None:
    """shimd killed between `runtime start` and saving the record: the
    container runs while the record says created. Simulated by starting it
    with runc behind shimd's back. A restarted shimd, and a StartContainer
    sent again, both take the runtime's word: RUNNING, not an error."""
    containers = fault_containers
    stack = containers.stack
    pod = containers.pod()
    runc_root = str(stack.run_dir / "runtimes" / "runc")
    ids = [containers.create(pod, containers.config(name, command=["sleep", "3600"])) for name in ("again", "restart")]
    for container_id in ids:
        subprocess.run(["runc", "--root", runc_root, "start", container_id], check=True)
        assert patient.status(container_id).state == CONTAINER_CREATED
    # The kubelet sends StartContainer again: it succeeds.
    containers.start(ids[0])
    assert patient.status(ids[0]).state == CONTAINER_RUNNING
    # A restarted shimd finds the other one running by itself.
    stack.supervisorctl("restart", "shimd")
    wait_all_running(stack)
    wait_until(lambda: patient.status(ids[1]).state == CONTAINER_RUNNING, 10, what="the start adopted")
    assert patient.exec(ids[1], "echo", "ok").stdout == b"ok\n"
    containers.cleanup()
    assert_no_leaks(stack)
