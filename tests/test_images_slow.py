"""A slow registry must not block the node's other pulls.

The hostile registry dribbles blob bytes (tests/hostile_registry.py); the
good image comes from the real docker-registry at the same time. A download
below image.min_download_rate fails naming the rate; one registry holds at
most its share of the download slots; and downloads stop once no caller
waits for their pull any more.
"""

from __future__ import annotations

import threading
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_images import Registry
from tests.harness import Stack, wait_until
from tests.hostile_registry import BlobPlan, HostileRegistry, hostile  # noqa: F401 - a fixture
from tests.oci_images import File, Layer, push_busybox, tar_layer


def pull(stack: Stack, reference: str, timeout: float) -> api_pb2.PullImageResponse:
    return stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=reference)), timeout=timeout)


class BackgroundPull:
    def __init__(self, stack: Stack, reference: str, timeout: float) -> None:
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._run, args=(stack, reference, timeout), daemon=True)
        self.thread.start()

    def _run(self, stack: Stack, reference: str, timeout: float) -> None:
        try:
            pull(stack, reference, timeout)
        except grpc.RpcError as exc:
            self.error = exc

    def join(self) -> grpc.RpcError | None:
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.error


def slow_image(hostile: HostileRegistry, name: str, interval: float, layers: int = 3):
    built = [Layer(tar_layer([File(f"etc/{name}-{index}", f"{name} {index}".encode() * 50)])) for index in range(layers)]
    return hostile.add_image(f"slow/{name}", "v1", built, plans=[BlobPlan(mode="dribble", interval=interval) for _ in built])


def stack_with(image: dict) -> Iterator[Stack]:
    own = Stack(config_overrides={"image": image})
    try:
        own.start()
        yield own
    finally:
        own.stop()


@pytest.fixture
def fair_stack() -> Iterator[Stack]:
    # Two slots, so (by default) one registry may hold one; no rate floor to speak of.
    yield from stack_with({"max_concurrent_downloads": 2, "min_download_rate": 1})


@pytest.fixture
def rate_stack() -> Iterator[Stack]:
    yield from stack_with({"min_download_rate": 100, "download_rate_window": 3.0})


def test_a_slow_registry_leaves_slots_to_others_and_stops_once_nobody_waits(
    fair_stack: Stack, hostile: HostileRegistry, registry: Registry
) -> None:
    good = push_busybox(registry, "pyrio/fair-busybox", "v1")
    slow = slow_image(hostile, "fair", interval=0.5)
    hostile.most_open_blob_requests = 0
    # The slow pull's caller gives up after 30 s: on a loaded machine the
    # steps below may take 20 s, and the slow pull must still hold its slot.
    background = BackgroundPull(fair_stack, slow.reference, timeout=30)
    wait_until(lambda: hostile.open_blob_requests >= 1, 15, what="the slow download to start")
    # The good pull gets a slot while the slow registry still dribbles:
    # with every slot taken it would wait past its own deadline.
    pull(fair_stack, good.reference, timeout=12)
    assert background.thread.is_alive() and hostile.open_blob_requests >= 1
    assert hostile.most_open_blob_requests == 1
    error = background.join()
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Nobody waits for the slow pull any more: its downloads stop (the
    # dribble would last minutes more), and nothing is left in tmp/.
    assert hostile.wait_idle(15)
    wait_until(lambda: not list((fair_stack.state_dir / "imaged" / "tmp").iterdir()), 10, what="tmp/ emptied")
    assert "no caller waits for this pull any more" in fair_stack.logs("imaged")


def test_a_download_below_the_minimum_rate_fails_naming_the_rate_while_a_good_pull_succeeds(
    rate_stack: Stack, hostile: HostileRegistry, registry: Registry
) -> None:
    good = push_busybox(registry, "pyrio/rate-busybox", "v1")
    slow = slow_image(hostile, "rate", interval=1.0)
    background = BackgroundPull(rate_stack, slow.reference, timeout=60)
    wait_until(lambda: hostile.open_blob_requests >= 1, 15, what="the slow download to start")
    pull(rate_stack, good.reference, timeout=30)
    error = background.join()
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    message = error.details()
    assert "download too slow" in message and f"from {hostile.host} in the last" in message
    assert "below image.min_download_rate (100 bytes/s over image.download_rate_window 3s)" in message
    assert hostile.wait_idle(15)


def test_a_cancelled_pull_stops_its_downloads(fair_stack: Stack, hostile: HostileRegistry) -> None:
    """The kubelet sets no deadline on PullImage: it cancels the call."""
    slow = slow_image(hostile, "cancelled", interval=0.5)
    call = fair_stack.images.PullImage.future(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=slow.reference)))
    wait_until(lambda: hostile.open_blob_requests >= 1, 15, what="the slow download to start")
    call.cancel()
    assert hostile.wait_idle(15)
    wait_until(lambda: "no caller waits for this pull any more" in fair_stack.logs("imaged"), 15, what="the pull to end")
    assert not list((fair_stack.state_dir / "imaged" / "tmp").iterdir())
