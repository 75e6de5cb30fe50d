"""Images and registries that try to fill the node's disk.

A decompression bomb, a sparse bomb, blobs bigger than their descriptors
declare, descriptors with no size or 2^50, and a pull that would eat into
the free space kept for the node: each is refused with a clear status, the
store grows by nothing (its usage is measured before and after, by blocks
allocated), and nothing is left in its tmp/.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_containers import Containers, TestImages
from tests.harness import Stack
from tests.hostile_registry import BlobPlan, HostileRegistry, gzip_bomb_layer, hostile, sparse_layer  # noqa: F401 - hostile is a fixture
from tests.oci_images import File, Layer, busybox_layer, tar_layer

MAX_LAYER_SIZE = 64 << 20
# Blocks a refused pull may leave: records rewritten, nothing of the layer.
GROWTH_SLACK = 256 << 10


def store_usage(stack: Stack) -> int:
    """Bytes allocated under the image store, counting hard links once."""
    seen, used = set(), 0
    for directory, dirs, files in os.walk(stack.state_dir / "imaged"):
        for name in dirs + files:
            info = os.lstat(os.path.join(directory, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                used += info.st_blocks * 512
    return used


def tmp_entries(stack: Stack) -> list[str]:
    return sorted(os.listdir(stack.state_dir / "imaged" / "tmp"))


def pull(stack: Stack, reference: str) -> api_pb2.PullImageResponse:
    return stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=reference)), timeout=120)


def refused_pull(stack: Stack, reference: str) -> tuple[grpc.StatusCode, str, int]:
    """(code, message, store growth in bytes) of a pull that must fail."""
    before = store_usage(stack)
    with pytest.raises(grpc.RpcError) as caught:
        pull(stack, reference)
    growth = store_usage(stack) - before
    print(f"store growth after refusing {reference}: {growth} bytes")
    assert tmp_entries(stack) == []
    return caught.value.code(), caught.value.details(), growth


@pytest.fixture(scope="module")
def bounded_stack() -> Iterator[Stack]:
    own = Stack(config_overrides={"image": {"max_layer_size": MAX_LAYER_SIZE}})
    try:
        own.start()
        yield own
    finally:
        own.stop()


def test_a_gzip_bomb_is_refused_at_max_layer_size_and_leaves_nothing(bounded_stack: Stack, hostile: HostileRegistry) -> None:
    bomb = gzip_bomb_layer(256 << 20)
    assert len(bomb.blob) < 1 << 20  # a small blob that expands 256 MiB
    image = hostile.add_image("bomb/gzip", "v1", [bomb])
    code, message, growth = refused_pull(bounded_stack, image.reference)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"expands to more than {MAX_LAYER_SIZE} bytes (image.max_layer_size)" in message
    assert growth < GROWTH_SLACK


def test_a_sparse_file_is_unpacked_with_its_holes_as_holes(
    bounded_stack: Stack, hostile: HostileRegistry, test_images: TestImages
) -> None:
    apparent = 48 << 20
    layer = sparse_layer(apparent, "data/sparse", b"tail")
    assert len(layer.blob) < 1024
    image = hostile.add_image("bomb/sparse-ok", "v1", [Layer(busybox_layer()), layer])
    before = store_usage(bounded_stack)
    pull(bounded_stack, image.reference)
    growth = store_usage(bounded_stack) - before
    print(f"store growth after pulling a {apparent}-byte sparse file: {growth} bytes")
    unpacked = bounded_stack.state_dir / "imaged" / "layers" / layer.diff_id.split(":", 1)[1] / "diff" / "data" / "sparse"
    info = os.stat(unpacked)
    assert info.st_size == apparent and info.st_blocks * 512 <= 64 << 10
    with open(unpacked, "rb") as handle:
        handle.seek(apparent - 4)
        assert handle.read() == b"tail"
    # The container sees the file as the image made it.
    own = Containers(bounded_stack, test_images)
    try:
        container = own.run(image=image.reference, command=["sleep", "3600"])
        reply = own.exec(container, "sh", "-c", "stat -c %s /data/sparse; tail -c 4 /data/sparse")
        assert reply.stdout.decode().split() == [str(apparent), "tail"], reply.stderr
    finally:
        own.cleanup()


def test_a_sparse_bomb_is_refused_without_writing_its_zeros(bounded_stack: Stack, hostile: HostileRegistry) -> None:
    bomb = sparse_layer(3 << 30)
    assert len(bomb.blob) < 400  # the bomb was 204 bytes
    image = hostile.add_image("bomb/sparse", "v1", [bomb])
    code, message, growth = refused_pull(bounded_stack, image.reference)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"sparse file 'sparse' is {3 << 30} bytes" in message and "image.max_layer_size" in message
    assert growth < GROWTH_SLACK


def _layer(tag: str) -> Layer:
    return Layer(tar_layer([File(f"etc/{tag}", tag.encode() * 1000)]))


def test_a_blob_larger_than_declared_is_cut_off_at_once(bounded_stack: Stack, hostile: HostileRegistry) -> None:
    layer = _layer("endless")
    image = hostile.add_image("lies/endless", "v1", [layer], plans=[BlobPlan(mode="endless")])
    code, message, growth = refused_pull(bounded_stack, image.reference)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"sent more than the {len(layer.blob)} bytes the manifest declares" in message
    assert growth < GROWTH_SLACK
    assert hostile.wait_idle()
    # It stopped reading at the first chunk past the declared size.
    assert hostile.sent[image.manifest["layers"][0]["digest"]] < 16 << 20


def test_a_content_length_beyond_the_declared_size_is_refused_before_reading(bounded_stack: Stack, hostile: HostileRegistry) -> None:
    layer = _layer("huge")
    image = hostile.add_image("lies/huge-length", "v1", [layer], plans=[BlobPlan(mode="huge-length")])
    code, message, growth = refused_pull(bounded_stack, image.reference)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"announces {1 << 40} bytes, the manifest declares {len(layer.blob)}" in message
    assert growth < GROWTH_SLACK


@pytest.mark.parametrize(
    "declared, expected",
    [
        (None, "declares no valid size (None)"),
        ("12", "declares no valid size ('12')"),
        (-1, "declares no valid size (-1)"),
        (1 << 50, f"declares {1 << 50} bytes, more than the {MAX_LAYER_SIZE} allowed (image.max_layer_size)"),
    ],
)
def test_a_descriptor_without_a_sane_size_is_refused_before_any_download(
    bounded_stack: Stack, hostile: HostileRegistry, declared: object, expected: str
) -> None:
    layer = _layer(f"size-{declared}")
    image = hostile.add_image(f"lies/size-{abs(hash(str(declared)))}", "v1", [layer], declared_sizes=[declared])
    code, message, growth = refused_pull(bounded_stack, image.reference)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert expected in message
    assert image.manifest["layers"][0]["digest"] not in hostile.blob_requests
    assert growth < GROWTH_SLACK


def test_a_pull_that_would_eat_into_the_free_space_reserve_is_refused(hostile: HostileRegistry) -> None:
    statvfs = os.statvfs("/tmp")
    reserve = statvfs.f_bavail * statvfs.f_frsize + (1 << 40)  # more than the disk has free
    own = Stack(config_overrides={"image": {"free_space_reserve": reserve}})
    try:
        own.start()
        image = hostile.add_image("reserve/small", "v1", [_layer("reserve")])
        code, message, growth = refused_pull(own, image.reference)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{reserve} are kept for the node (image.free_space_reserve)" in message
        assert image.manifest["layers"][0]["digest"] not in hostile.blob_requests
        assert growth < GROWTH_SLACK
    finally:
        own.stop()


def test_the_bounded_stack_still_pulls_ordinary_images(bounded_stack: Stack, hostile: HostileRegistry) -> None:
    image = hostile.add_image("fine/busybox", "v1", [Layer(busybox_layer()), _layer("fine")])
    assert pull(bounded_stack, image.reference).image_ref.startswith("sha256:")


def test_the_store_kept_nothing_of_the_refused_pulls(bounded_stack: Stack) -> None:
    assert tmp_entries(bounded_stack) == []
    assert not list(Path(bounded_stack.state_dir / "imaged" / "tmp").iterdir())


@pytest.mark.parametrize(
    "entry, expected",
    [
        (File("bin/tool", b"x", 0o755, xattrs={"security.capability": "garbage"}),
         "entry 'bin/tool' has an xattr 'security.capability' the kernel refuses (Invalid argument)"),
        (File("a" * 5000, b"x"), "has a name component of 5000 bytes, more than the 255 a Linux file name may have"),
        (File("/".join(["d" * 200] * 25), b"x"), "has a path of 5024 characters, too long to unpack"),
    ],
    ids=["malformed-capability", "5000-character-name", "5000-character-path"],
)
def test_an_entry_no_file_can_be_made_of_is_an_invalid_layer_and_leaves_nothing(
    bounded_stack: Stack, hostile: HostileRegistry, entry: File, expected: str
) -> None:
    layer = Layer(tar_layer([File("etc/before", b"kept out"), entry]))
    image = hostile.add_image(f"invalid/{abs(hash(expected))}", "v1", [layer])
    code, message, growth = refused_pull(bounded_stack, image.reference)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in message and "refusing the layer" in message
    assert len(message) < 1000  # the name is cut, not echoed whole
    assert growth < GROWTH_SLACK
    assert not (bounded_stack.state_dir / "imaged" / "layers" / layer.diff_id.split(":", 1)[1]).exists()
