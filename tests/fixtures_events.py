"""GetContainerEvents readers for the events tests.

`EventReader` opens a stream on its own gRPC channel and reads it on a
thread into `events`, keeping the status it ended with (`code`, `details`).
With `read=False` it opens the stream and reads nothing until `resume()`:
the slow subscriber.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.harness import Stack, wait_until

EVENT_NAMES = {
    api_pb2.CONTAINER_CREATED_EVENT: "CREATED",
    api_pb2.CONTAINER_STARTED_EVENT: "STARTED",
    api_pb2.CONTAINER_STOPPED_EVENT: "STOPPED",
    api_pb2.CONTAINER_DELETED_EVENT: "DELETED",
}
# A reader that does not read must stall the stream soon: no BDP growth of
# the flow-control window, a small one to start with.
STALLED_CHANNEL_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


class EventReader:
    def __init__(self, stack: Stack, read: bool = True) -> None:
        options = [] if read else STALLED_CHANNEL_OPTIONS
        self.channel = grpc.insecure_channel(f"unix://{stack.socket}", options=options)
        self.stream = api_pb2_grpc.RuntimeServiceStub(self.channel).GetContainerEvents(api_pb2.GetEventsRequest())
        self.events: list[tuple[float, api_pb2.ContainerEventResponse]] = []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._reading = threading.Event()
        if read:
            self._reading.set()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self._reading.wait()
        try:
            for event in self.stream:
                self.events.append((time.time(), event))
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code, self.details = exc.code(), exc.details() or ""

    def resume(self) -> None:
        self._reading.set()

    def wait_subscribed(self) -> None:
        """crigw sends the headers once it subscribed the stream: from then on
        every event reaches it."""
        self.stream.initial_metadata()

    def of(self, container_id: str) -> list[api_pb2.ContainerEventResponse]:
        return [event for _, event in self.events if event.container_id == container_id]

    def names_of(self, container_id: str) -> list[str]:
        return [EVENT_NAMES[event.container_event_type] for event in self.of(container_id)]

    def wait_for(self, predicate: Callable[["EventReader"], Any], timeout: float = 20, what: str = "events") -> Any:
        return wait_until(lambda: predicate(self), timeout, what=what)

    def wait_ended(self, timeout: float = 20) -> grpc.StatusCode:
        self._thread.join(timeout)
        assert self.code is not None, "the events stream did not end"
        return self.code

    def close(self) -> None:
        self.stream.cancel()
        self._reading.set()
        self._thread.join(5)
        self.channel.close()
