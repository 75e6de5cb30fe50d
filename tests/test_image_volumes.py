"""Image volumes (CRI Mount.image, the kubelet's ImageVolume) through the
socket: an image pulled as usual is mounted read-only into a container by
imaged, as an overlay of its own layers."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2

from common.mounts import mount_points
from tests.fixtures_containers import Containers, wait_for_log
from tests.oci_images import Dir, File, PushedImage, build_and_push, tar_layer


@pytest.fixture(scope="session")
def content_image(registry: Any) -> PushedImage:
    """Two layers of data, no shell: the second overrides a file of the first."""
    first = tar_layer([Dir("data"), File("data/hello.txt", b"first\n"), File("data/kept.txt", b"kept\n")])
    second = tar_layer([Dir("data"), File("data/hello.txt", b"hello from the image\n")])
    return build_and_push(registry, "pyrio/volume-content", "v1", layers=[first, second], config={})


def image_id(containers: Containers, reference: str) -> str:
    containers.pull(reference)
    return containers.stack.images.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=reference)), timeout=20).image.id


def with_image_volume(containers: Containers, name: str, command: list[str], image: str, sub_path: str = "") -> api_pb2.ContainerConfig:
    config = containers.config(name, command=command)
    config.mounts.append(api_pb2.Mount(container_path="/img", image=api_pb2.ImageSpec(image=image), image_sub_path=sub_path))
    return config


def test_an_image_is_mounted_read_only_as_a_volume(containers: Containers, content_image: PushedImage) -> None:
    volume_image = image_id(containers, content_image.reference)
    script = "cat /img/data/hello.txt /img/data/kept.txt; touch /img/new 2>&1; echo done; sleep 300"
    container_id = containers.create(containers.pod(), with_image_volume(containers, "imgvol", ["sh", "-c", script], volume_image))
    containers.start(container_id)
    text = wait_for_log(containers, container_id, "done")
    assert "hello from the image" in text and "kept" in text and "first" not in text
    assert "/img/new: Read-only file system" in text
    mount = next(entry for entry in containers.info(container_id)["runtime_spec"]["mounts"] if entry["destination"] == "/img")
    assert {"ro", "noexec", "nosuid", "nodev"} <= set(mount["options"])
    # No copy: the source is imaged's overlay of the image's own layers.
    with open("/proc/self/mountinfo") as handle:
        line = next(line for line in handle if line.split()[4] == mount["source"])
    assert " - overlay " in line and "lowerdir=" in line and line.split()[5].startswith("ro")

    # In use by a volume: the image stays, and the error names the container.
    with pytest.raises(grpc.RpcError) as caught:
        containers.stack.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=volume_image)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and container_id[:12] in caught.value.details()

    containers.stop(container_id)
    containers.remove(container_id)
    assert mount["source"] not in mount_points()
    containers.stack.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=volume_image)), timeout=30)
    containers._pulled.discard(content_image.reference)


def test_an_image_sub_path_is_mounted(containers: Containers, content_image: PushedImage) -> None:
    volume_image = image_id(containers, content_image.reference)
    config = with_image_volume(containers, "subpath", ["cat", "/img/hello.txt"], volume_image, sub_path="data")
    container_id = containers.create(containers.pod(), config)
    containers.start(container_id)
    assert containers.output(container_id) == "hello from the image"
    missing = with_image_volume(containers, "missing-sub", ["true"], volume_image, sub_path="nope")
    with pytest.raises(grpc.RpcError) as caught:
        containers.create(containers.pod(), missing)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in caught.value.details()


def test_a_missing_image_volume_is_not_found(containers: Containers) -> None:
    config = with_image_volume(containers, "no-image", ["true"], "sha256:" + "0" * 64)
    with pytest.raises(grpc.RpcError) as caught:
        containers.create(containers.pod(), config)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "image volume" in caught.value.details()


def test_image_volume_with_a_host_path_is_invalid(containers: Containers, content_image: PushedImage) -> None:
    volume_image = image_id(containers, content_image.reference)
    config = containers.config("both", command=["true"])
    config.mounts.append(api_pb2.Mount(container_path="/img", host_path=str(containers.log_root),
                                       image=api_pb2.ImageSpec(image=volume_image)))
    with pytest.raises(grpc.RpcError) as caught:
        containers.create(containers.pod(), config)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mutually exclusive" in caught.value.details()
