"""Fixtures for the containers tests (kept apart so each area owns its file).

`containers`: a `Containers` helper on the shared stack that pulls the test
images, runs pods (with a private log directory) and containers, and at the
end of the test removes every container and pod it made, even when the test
failed. `test_images`: the busybox test image plus variants with their own
Entrypoint/Cmd, Env and User, pushed once per session.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from common.cgroups import CgroupManager, detect
from tests.fixtures_pods import pod_config
from tests.harness import Stack, wait_until
from tests.oci_images import PushedImage, push_busybox

CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED = api_pb2.CONTAINER_CREATED, api_pb2.CONTAINER_RUNNING, api_pb2.CONTAINER_EXITED


@dataclass
class TestImages:
    __test__ = False  # a fixture's value, not a test class for pytest to collect

    busybox: PushedImage
    entrypoint: PushedImage  # Entrypoint ["echo", "ep"], Cmd ["from-cmd"]
    env_user: PushedImage  # Env FROM_IMAGE/OVERRIDE, User "app", WorkingDir /home/app, StopSignal SIGUSR1, Volume /data


@pytest.fixture(scope="session")
def test_images(registry: Any, busybox_image: PushedImage) -> TestImages:
    return TestImages(
        busybox=busybox_image,
        entrypoint=push_busybox(registry, "pyrio/entrypoint", "v1", {"Entrypoint": ["echo", "ep"], "Cmd": ["from-cmd"]}),
        env_user=push_busybox(
            registry,
            "pyrio/env-user",
            "v1",
            {
                "Env": ["FROM_IMAGE=image", "OVERRIDE=image", "PATH=/usr/local/bin:/usr/bin:/bin"],
                "User": "app",
                "WorkingDir": "/home/app",
                "StopSignal": "SIGUSR1",
                "Volumes": {"/data": {}},
            },
        ),
    )


def parse_cri_log(text: str) -> list[tuple[str, str, str, str]]:
    """(timestamp, stream, tag, content) per line; asserts the CRI format."""
    entries = []
    for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
        timestamp, stream, tag, content = line.split(" ", 3) if line.count(" ") >= 3 else (line.split(" ") + [""])[:4]
        assert stream in ("stdout", "stderr"), line
        assert tag in ("P", "F"), line
        assert timestamp.endswith("Z") and "T" in timestamp, line
        entries.append((timestamp, stream, tag, content))
    return entries


class Containers:
    """Pods and containers of one test on a stack, all removed at the end."""

    def __init__(self, stack: Stack, images: TestImages) -> None:
        self.stack = stack
        self.images = images
        self.log_root = Path(tempfile.mkdtemp(prefix="pyrio-ctr-logs-", dir=str(stack.root)))
        self.pod_ids: list[str] = []
        self.container_ids: list[str] = []
        self._pulled: set[str] = set()

    @property
    def runtime(self) -> Any:
        return self.stack.runtime

    def pull(self, image: str) -> None:
        if image not in self._pulled:
            self.stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
            self._pulled.add(image)

    def pod(self, runtime_handler: str = "", **options: Any) -> tuple[str, api_pb2.PodSandboxConfig]:
        log_directory = self.log_root / f"pod{len(self.pod_ids)}"
        config = pod_config(log_directory=str(log_directory), **options)
        reply = self.runtime.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler), timeout=120
        )
        self.pod_ids.append(reply.pod_sandbox_id)
        return reply.pod_sandbox_id, config

    def config(self, name: str = "main", image: str = "", **fields: Any) -> api_pb2.ContainerConfig:
        image = image or self.images.busybox.reference
        linux = fields.pop("linux", None)
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name),
            image=api_pb2.ImageSpec(image=image),
            log_path=f"{name}.log",
            **fields,
        )
        if linux is not None:
            config.linux.CopyFrom(linux)  # its PID mode as given (POD is 0, the default)
        else:
            config.linux.security_context.namespace_options.pid = api_pb2.CONTAINER
        return config

    def create(self, pod: tuple[str, api_pb2.PodSandboxConfig], config: api_pb2.ContainerConfig) -> str:
        self.pull(config.image.image)
        reply = self.runtime.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=pod[0], config=config, sandbox_config=pod[1]), timeout=120
        )
        self.container_ids.append(reply.container_id)
        return reply.container_id

    def start(self, container_id: str) -> None:
        self.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id), timeout=60)

    def run(self, pod: tuple[str, api_pb2.PodSandboxConfig] | None = None, name: str = "main", **fields: Any) -> str:
        pod = pod or self.pod()
        container_id = self.create(pod, self.config(name, **fields))
        self.start(container_id)
        return container_id

    def status(self, container_id: str, verbose: bool = False) -> api_pb2.ContainerStatusResponse:
        return self.runtime.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=container_id, verbose=verbose), timeout=20
        )

    def info(self, container_id: str) -> dict[str, Any]:
        return json.loads(self.status(container_id, verbose=True).info["info"])

    def wait_state(self, container_id: str, state: int, timeout: float = 30) -> api_pb2.ContainerStatus:
        return wait_until(
            lambda: (status := self.status(container_id).status).state == state and status,
            timeout,
            what=f"container {container_id[:12]} in state {api_pb2.ContainerState.Name(state)}",
        )

    def wait_exited(self, container_id: str, timeout: float = 30) -> api_pb2.ContainerStatus:
        return self.wait_state(container_id, CONTAINER_EXITED, timeout)

    def stop(self, container_id: str, timeout: int = 0) -> None:
        self.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=container_id, timeout=timeout), timeout=timeout + 60)

    def remove(self, container_id: str) -> None:
        self.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id), timeout=60)

    def exec(self, container_id: str, *cmd: str, timeout: int = 10) -> api_pb2.ExecSyncResponse:
        return self.runtime.ExecSync(
            api_pb2.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout), timeout=timeout + 60
        )

    def log_text(self, container_id: str) -> str:
        path = self.status(container_id).status.log_path
        return Path(path).read_text()

    def log_contents(self, container_id: str) -> list[str]:
        """Full lines of the log (P parts joined), prefixed with the stream."""
        lines, partial = [], ""
        for _, stream, tag, content in parse_cri_log(self.log_text(container_id)):
            partial += content
            if tag == "F":
                lines.append(f"{stream}:{partial}")
                partial = ""
        if partial:
            lines.append(f"{stream}:{partial}")
        return lines

    def output(self, container_id: str, wait_exit: bool = True) -> str:
        if wait_exit:
            self.wait_exited(container_id)
        return "\n".join(line.split(":", 1)[1] for line in self.log_contents(container_id))

    def cleanup(self) -> None:
        for container_id in reversed(self.container_ids):
            try:
                self.remove(container_id)
            except grpc.RpcError:
                pass
        for sandbox_id in reversed(self.pod_ids):
            try:
                self.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
                self.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
            except grpc.RpcError:
                pass


def _containers_on(stack: Stack, images: TestImages) -> Iterator[Containers]:
    own = Containers(stack, images)
    try:
        yield own
    finally:
        own.cleanup()


@pytest.fixture
def containers(stack: Stack, test_images: TestImages) -> Iterator[Containers]:
    yield from _containers_on(stack, test_images)


@pytest.fixture
def fresh_containers(fresh_stack: Stack, test_images: TestImages) -> Iterator[Containers]:
    """Containers on a private stack, for tests that kill services."""
    yield from _containers_on(fresh_stack, test_images)


def wait_for_log(containers: Containers, container_id: str, needle: str, timeout: float = 20) -> str:
    return wait_until(
        lambda: needle in (text := containers.log_text(container_id)) and text, timeout, what=f"{needle!r} in the log"
    )


def cgroup_file(containers: Containers, container_id: str, v1: str, v2: str) -> Path:
    """A file of the container's cgroup: `v1` ("memory/memory.limit_in_bytes") on a v1 or hybrid
    host, `v2` ("memory.max") on a v2 one, for either cgroup driver."""
    return container_cgroup_file(containers.info(container_id)["cgroups_path"], v1, v2)


def container_cgroup_file(cgroups_path: str, v1: str, v2: str) -> Path:
    manager = CgroupManager(detect(), "systemd" if ":" in cgroups_path else "cgroupfs")
    cgroup = manager.cgroup_of(cgroups_path).strip("/")
    if manager.hierarchy.unified:
        return manager.hierarchy.root / cgroup / v2
    controller, name = v1.split("/", 1)
    return manager.hierarchy.root / controller / cgroup / name

