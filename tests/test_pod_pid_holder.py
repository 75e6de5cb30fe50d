"""A shared-PID pod's PID 1 (services/netd/pod_init.py): the pod cannot
signal it away, it lives in the pod's cgroup, shows nothing of the host, and
a create in a pod whose PID 1 is gone is refused without leftovers (issue 15
item 7, issue 14 item 3)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_containers import CONTAINER_RUNNING, Containers
from tests.fixtures_pods import sandbox_info
from tests.harness import cgroup_dirs, wait_until


def pod_pid_namespace() -> api_pb2.LinuxContainerConfig:
    linux = api_pb2.LinuxContainerConfig()
    linux.security_context.namespace_options.pid = api_pb2.POD
    return linux


def shared_pid_pod(containers: Containers) -> tuple[tuple[str, api_pb2.PodSandboxConfig], int]:
    pod = containers.pod(pid_mode=api_pb2.POD)
    holder = int(sandbox_info(containers.stack, pod[0])["pid_holder"])
    assert holder > 0
    return pod, holder


def run_in_pod(containers: Containers, pod: tuple[str, api_pb2.PodSandboxConfig], name: str) -> str:
    return containers.run(pod, name, command=["sh", "-c", "exec sleep 3600"], linux=pod_pid_namespace())


def process_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def rootfs_entries(stack) -> set[str]:
    """Container root filesystems and their records in the image store."""
    store = next(Path(stack.state_dir).glob("imaged*"))
    return {str(path.relative_to(store)) for kind in ("containers", "rootfs") for path in store.rglob(kind + "/*")}


def test_pid_1_ignores_every_signal_from_the_pod(containers: Containers) -> None:
    pod, holder = shared_pid_pod(containers)
    killer = run_in_pod(containers, pod, "killer")
    bystander = run_in_pod(containers, pod, "bystander")
    for signal_name in ("TERM", "INT", "HUP", "QUIT", "USR1", "KILL", "STOP"):
        reply = containers.exec(killer, "kill", f"-{signal_name}", "1")
        assert reply.exit_code == 0, reply.stderr  # sent: the kernel drops it
    time.sleep(0.5)
    assert os.path.exists(f"/proc/{holder}")
    assert open(f"/proc/{holder}/stat").read().rsplit(")", 1)[1].split()[0] == "S"  # not stopped
    for container_id in (killer, bystander):
        assert containers.status(container_id).status.state == CONTAINER_RUNNING
    assert containers.exec(bystander, "echo", "alive").stdout == b"alive\n"
    # The pod still takes containers, and they see the same PID 1.
    late = run_in_pod(containers, pod, "late")
    assert containers.exec(late, "cat", "/proc/1/cmdline").stdout == b"pause\0"


def test_pid_1_reaps_orphans_and_shows_nothing_of_the_host(containers: Containers) -> None:
    pod, holder = shared_pid_pod(containers)
    container_id = run_in_pod(containers, pod, "main")
    cmdline = containers.exec(container_id, "cat", "/proc/1/cmdline").stdout
    assert cmdline == b"pause\0"
    for host_detail in (str(containers.stack.root), sys.prefix, "python"):
        assert host_detail.encode() not in cmdline
    # An orphan (its parent, the exec'd shell, exits at once) is reaped by PID 1.
    containers.exec(container_id, "sh", "-c", "(sleep 0.2 &) ; exit 0")
    time.sleep(1.0)
    states = containers.exec(container_id, "sh", "-c", "cat /proc/[0-9]*/stat").stdout.decode()
    assert " Z " not in states, states
    # In the pod's cgroup (the sandbox's cgroup parent): its memory, CPU and pids count are the pod's.
    parent = sandbox_info(containers.stack, pod[0])["cgroup_parent"]
    checked = 0
    for line in Path(f"/proc/{holder}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if set(controllers.split(",")) & {"memory", "pids", "cpu"}:
            assert path.startswith(parent.rstrip("/") + "/pyrio-pod-"), line
            checked += 1
    assert checked


def test_netd_restart_keeps_the_pid_1(fresh_containers: Containers) -> None:
    containers = fresh_containers
    pod, holder = shared_pid_pod(containers)
    container_id = run_in_pod(containers, pod, "main")
    containers.stack.supervisorctl("restart", "netd")
    containers.stack.wait_ready()
    assert os.path.exists(f"/proc/{holder}")
    status = containers.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod[0]), timeout=10)
    assert status.status.state == api_pb2.SANDBOX_READY
    assert containers.status(container_id).status.state == CONTAINER_RUNNING
    run_in_pod(containers, pod, "after-restart")
    # Its stop still ends it and removes its cgroup.
    containers.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod[0]), timeout=120)
    wait_until(lambda: not os.path.exists(f"/proc/{holder}"), 10, what="the PID holder gone")
    leftover = [path for directory in cgroup_dirs(containers.stack.cgroup_parent) for path in directory.glob("pyrio-pod-*")]
    assert leftover == []


def test_create_in_a_pod_whose_pid_1_is_gone_is_refused_without_leftovers(containers: Containers) -> None:
    pod, holder = shared_pid_pod(containers)
    run_in_pod(containers, pod, "before")
    stack = containers.stack
    containers_dir = Path(stack.state_dir) / "shimd" / "containers"
    before = {
        "containers": set(os.listdir(containers_dir)),
        "cgroups": {path.name for directory in cgroup_dirs(stack.cgroup_parent) for path in directory.iterdir() if path.is_dir()},
        "rootfs": rootfs_entries(stack),
    }
    listed = len(containers.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers)
    os.kill(holder, signal.SIGKILL)  # from the node: nothing in the pod can
    wait_until(lambda: not process_alive(holder), 10, what="the PID holder gone")
    with pytest.raises(grpc.RpcError) as caught:
        containers.create(pod, containers.config("after", command=["true"], linux=pod_pid_namespace()))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert "not ready" in caught.value.details()
    assert set(os.listdir(containers_dir)) == before["containers"]
    cgroups_now = {path.name for directory in cgroup_dirs(stack.cgroup_parent) for path in directory.iterdir() if path.is_dir()}
    assert cgroups_now <= before["cgroups"]
    assert len(containers.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers) == listed
    assert rootfs_entries(stack) == before["rootfs"]
    status = containers.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod[0]), timeout=10)
    assert status.status.state == api_pb2.SANDBOX_NOTREADY
