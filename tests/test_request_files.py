"""Files a CRI request names are read only when they are small regular files.

A seccomp Localhost profile of /dev/zero once made shimd allocate 23.8 GB
until the OOM killer stopped it; a FIFO would block it forever. Each of these
must be refused with INVALID_ARGUMENT, leave no container behind, and leave
shimd serving.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_containers import Containers
from tests.fixtures_pods import pod_config


def _localhost_profile(path: str) -> api_pb2.LinuxContainerConfig:
    linux = api_pb2.LinuxContainerConfig()
    linux.security_context.seccomp.profile_type = api_pb2.SecurityProfile.Localhost
    linux.security_context.seccomp.localhost_ref = path
    return linux


def _hostile_paths(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """kind -> (path, words the error must contain)."""
    fifo = tmp_path / "profile.fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as handle:
        handle.truncate((1 << 20) + 1)  # sparse: costs no disk
    directory = tmp_path / "profile-dir"
    directory.mkdir()
    return {
        "dev-zero": ("/dev/zero", "not a regular file (a character device)"),
        "fifo": (str(fifo), "not a regular file (a FIFO)"),
        "directory": (str(directory), "not a regular file (a directory)"),
        "too-large": (str(huge), "larger than the 1048576-byte limit"),
    }


def test_hostile_seccomp_localhost_profiles_are_invalid_argument(containers: Containers, tmp_path: Path) -> None:
    pod = containers.pod()
    for kind, (path, words) in _hostile_paths(tmp_path).items():
        with pytest.raises(grpc.RpcError) as caught:
            containers.create(pod, containers.config(kind, linux=_localhost_profile(path)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, caught.value.details())
        assert words in caught.value.details() and "seccomp Localhost profile" in caught.value.details(), kind
    listed = containers.runtime.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(pod_sandbox_id=pod[0])), timeout=20)
    assert list(listed.containers) == []  # no half-created container
    # shimd is still serving: a container with a good profile runs.
    good = tmp_path / "allow.json"
    good.write_text('{"defaultAction": "SCMP_ACT_ALLOW"}')
    container_id = containers.run(pod, "good", command=["sh", "-c", "grep Seccomp: /proc/self/status"],
                                  linux=_localhost_profile(str(good)))
    assert containers.output(container_id) == "Seccomp:\t2"


def test_termination_message_file_that_is_a_fifo_does_not_block_status(containers: Containers, tmp_path: Path) -> None:
    """The kubelet's mount at terminationMessagePath may be anything; a FIFO
    with no writer must not block ContainerStatus."""
    fifo = tmp_path / "termination.fifo"
    os.mkfifo(fifo)
    container_id = containers.run(
        command=["sh", "-c", "exit 3"],
        annotations={"io.kubernetes.container.terminationMessagePath": "/dev/termination-log"},
        mounts=[api_pb2.Mount(container_path="/dev/termination-log", host_path=str(fifo))],
    )
    status = containers.wait_exited(container_id)
    assert status.exit_code == 3 and status.message == ""


def test_log_path_that_is_a_fifo_or_a_device_is_invalid_argument(containers: Containers, tmp_path: Path) -> None:
    """The shim appends the container's output to log_directory/log_path: a
    FIFO would block it, a device would receive the output."""
    fifo_dir = tmp_path / "logs"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "c.log")
    for directory, name in ((fifo_dir, "c.log"), (Path("/dev"), "null")):
        config = pod_config(log_directory=str(directory))
        reply = containers.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=120)
        containers.pod_ids.append(reply.pod_sandbox_id)
        container = containers.config("logger", command=["echo", "hi"])
        container.log_path = name
        with pytest.raises(grpc.RpcError) as caught:
            containers.create((reply.pod_sandbox_id, config), container)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "log_path" in caught.value.details() and "not a regular file" in caught.value.details()
