"""What an operator sees with the real crictl (issue 12 item 6): containers
show the image the kubelet asked for, not the sha256 id it resolved it to."""

from __future__ import annotations

import json
import subprocess

from cri_api.v1 import api_pb2

from tests.fixtures_containers import Containers
from tests.node_tools import find_tool


def crictl(containers: Containers, *args: str) -> dict:
    command = [find_tool("crictl"), "--runtime-endpoint", f"unix://{containers.stack.socket}", "--timeout", "20s", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def create_by_id(containers: Containers, pod: tuple, config: api_pb2.ContainerConfig) -> str:
    """CreateContainer as the kubelet calls it (the image is pulled already, named by id)."""
    reply = containers.runtime.CreateContainer(
        api_pb2.CreateContainerRequest(pod_sandbox_id=pod[0], config=config, sandbox_config=pod[1]), timeout=120
    )
    containers.container_ids.append(reply.container_id)
    return reply.container_id


def test_ps_and_inspect_show_the_image_name(containers: Containers) -> None:
    find_tool("crictl")
    image = containers.images.busybox
    containers.pull(image.reference)
    image_id = containers.stack.images.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image.reference)), timeout=10
    ).image.id
    assert image_id.startswith("sha256:")
    pod = containers.pod()
    # As the kubelet sends it: the resolved id, and what the pod spec said.
    asked = containers.config("asked", image=image_id, command=["sleep", "600"])
    asked.image.user_specified_image = image.reference
    by_kubelet = create_by_id(containers, pod, asked)
    containers.start(by_kubelet)
    # Created by id alone: the image's tag names it.
    by_id = create_by_id(containers, pod, containers.config("by-id", image=image_id, command=["sleep", "600"]))

    listed = {item["id"]: item for item in crictl(containers, "ps", "-a", "-o", "json")["containers"]}
    for container_id in (by_kubelet, by_id):
        assert listed[container_id]["image"]["image"] == image.reference, listed[container_id]
        assert listed[container_id]["imageRef"] == f"{image.registry_host}/{image.repository}@{image.manifest_digest}"
        assert listed[container_id]["imageId"] == image_id
        status = crictl(containers, "inspect", container_id)["status"]
        assert status["image"]["image"] == image.reference, status["image"]
        assert status["imageRef"] == listed[container_id]["imageRef"]
        assert status["imageId"] == image_id
    assert listed[by_kubelet]["image"]["userSpecifiedImage"] == image.reference
