"""GetContainerEvents: the kubelet's Evented PLEG stream.

shimd publishes container events (services/shimd/events.py) on a ZeroMQ
PUB socket beside its RPC socket (common/event_bus.py); crigw's one
`EventHub` subscribes, completes each event with the pod's PodSandboxStatus
(netd) and every ContainerStatus of the pod (shimd `container.statuses`),
and hands it to every open stream. Sandbox events (the sandbox id as
container_id, as CRI-O and containerd send for the infra container) are
published by crigw's own sandbox handlers through `publish_sandbox_event`.

The promise is "delivered or told": whenever events may have been missed (shimd
restarted, a sequence number was skipped, the publisher went silent, the
statuses of an event cannot be read) every open stream ends UNAVAILABLE, so
the kubelet relists; a crigw restart ends them by closing the connection.
A stream whose reader falls `events.subscriber_queue` events behind ends
RESOURCE_EXHAUSTED; the hub itself never waits for a reader.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Iterator

from cri_api.v1 import api_pb2

from common.errors import NotFound, PyrioError, ResourceExhausted, Unavailable
from common.event_bus import EventSubscriber, Gap, events_endpoint
from services.crigw.convert import dict_to_message
from services.crigw.gateway import Gateway
from services.crigw.handlers import cri_handler, current_context
from services.crigw.status import bounded_message, grpc_code_for

log = logging.getLogger("pyrio.crigw.events")

EVENT_TYPES = {
    "CREATED": api_pb2.CONTAINER_CREATED_EVENT,
    "STARTED": api_pb2.CONTAINER_STARTED_EVENT,
    "STOPPED": api_pb2.CONTAINER_STOPPED_EVENT,
    "DELETED": api_pb2.CONTAINER_DELETED_EVENT,
}
# How long a new stream waits for shimd's event stream to be heard.
SYNC_WAIT_SECONDS = 3.0
# A stream cut off while its thread is stuck sending (a reader that reads
# nothing) is cancelled after this long, so it gives back its thread.
STUCK_CANCEL_SECONDS = 5.0
# Sandbox statuses remembered for events that arrive after netd forgot
# the pod (container DELETED events of a RemovePodSandbox).
REMEMBERED_SANDBOXES = 4096
STATUS_TIMEOUT_SECONDS = 5.0


def container_status_messages(gateway: Gateway, sandbox_id: str) -> list[api_pb2.ContainerStatus]:
    """Every ContainerStatus of a pod, from shimd in one call."""
    statuses = gateway.shimd.call(
        "container.statuses", {"sandbox_id": sandbox_id}, timeout=STATUS_TIMEOUT_SECONDS, idempotent=True
    )
    messages = []
    for status in statuses:
        status.pop("info", None)
        messages.append(dict_to_message(status, api_pb2.ContainerStatus))
    return messages


class Subscription:
    def __init__(self, size: int, context: Any) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self.context = context
        self.ended: PyrioError | None = None

    def offer(self, event: api_pb2.ContainerEventResponse) -> bool:
        """Queue an event without waiting; False when the reader is too far behind."""
        try:
            self.queue.put_nowait(event)
            return True
        except queue.Full:
            return False

    def end(self, error: PyrioError) -> None:
        if self.ended is not None:
            return
        self.ended = error
        # Unblock a reader waiting on an empty queue.
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        timer = threading.Timer(STUCK_CANCEL_SECONDS, self._cancel_if_stuck)
        timer.daemon = True
        timer.start()

    def _cancel_if_stuck(self) -> None:
        if self.context.is_active():
            self.context.cancel()


class EventHub:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._lock = threading.Lock()
        # One event completed and fanned out at a time: streams see one order.
        self._dispatch_lock = threading.Lock()
        self._subscriptions: list[Subscription] = []
        self._sandboxes: OrderedDict[str, api_pb2.PodSandboxStatus] = OrderedDict()
        self.delivered = 0
        self.cut_off = 0
        self._subscriber = EventSubscriber(events_endpoint(gateway.config, "shimd"), "shimd", self._on_shimd_event, self._on_gap)
        self._subscriber.start()

    # --- streams ------------------------------------------------------------

    def subscribe(self, context: Any) -> Subscription:
        limits = self.gateway.config.events
        until = time.monotonic() + SYNC_WAIT_SECONDS
        while not self._subscriber.synced:
            if time.monotonic() >= until:
                raise Unavailable("shimd's container events are not reachable (is shimd running?); relist and retry")
            time.sleep(0.05)
        with self._lock:
            if len(self._subscriptions) >= limits.max_subscribers:
                raise ResourceExhausted(
                    f"{limits.max_subscribers} GetContainerEvents streams are open (events.max_subscribers); "
                    "close one or raise the limit"
                )
            subscription = Subscription(limits.subscriber_queue, context)
            self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    def _end_all(self, error: PyrioError) -> None:
        with self._lock:
            ending, self._subscriptions = self._subscriptions, []
        for subscription in ending:
            subscription.end(error)

    @property
    def stream_count(self) -> int:
        return len(self._subscriptions)

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscriptions)

    # --- events -------------------------------------------------------------

    def _on_gap(self, gap: Gap) -> None:
        self._end_all(Unavailable(f"container events may have been missed ({gap.reason}); relist and subscribe again"))

    def _on_shimd_event(self, message: dict[str, Any]) -> None:
        if message.get("kind") != "container" or not self.has_subscribers:
            return
        self.dispatch(str(message["type"]), str(message["container_id"]), str(message["sandbox_id"]),
                      int(message["created_at"]))

    def remember_sandbox(self, status: api_pb2.PodSandboxStatus) -> None:
        with self._lock:
            self._sandboxes[status.id] = status
            self._sandboxes.move_to_end(status.id)
            while len(self._sandboxes) > REMEMBERED_SANDBOXES:
                self._sandboxes.popitem(last=False)

    def _sandbox_status(self, sandbox_id: str) -> api_pb2.PodSandboxStatus:
        from services.crigw.sandboxes import sandbox_status_message

        try:
            record = self.gateway.netd.call(
                "sandbox.status", {"sandbox_id": sandbox_id}, timeout=STATUS_TIMEOUT_SECONDS, idempotent=True
            )
        except NotFound:
            with self._lock:
                remembered = self._sandboxes.get(sandbox_id)
            if remembered is None:
                raise
            return remembered
        status = sandbox_status_message(record)
        self.remember_sandbox(status)
        return status

    def dispatch(
        self,
        event_type: str,
        container_id: str,
        sandbox_id: str,
        created_at: int,
        sandbox_status: api_pb2.PodSandboxStatus | None = None,
    ) -> None:
        """Complete one event with its statuses and give it to every stream."""
        with self._dispatch_lock:
            if not self.has_subscribers:
                return
            try:
                pod_status = sandbox_status or self._sandbox_status(sandbox_id)
            except NotFound:
                # The pod is gone, and its own DELETED event says so.
                log.info("event of a container whose pod is gone", extra={"container_id": container_id, "type": event_type})
                return
            except PyrioError as exc:
                self._end_all(Unavailable(
                    f"cannot read the pod status of a {event_type} event of {container_id[:12]} ({exc.message}); relist"
                ))
                return
            try:
                event = api_pb2.ContainerEventResponse(
                    container_id=container_id,
                    container_event_type=EVENT_TYPES[event_type],
                    created_at=created_at,
                    pod_sandbox_status=pod_status,
                    containers_statuses=container_status_messages(self.gateway, sandbox_id),
                )
            except PyrioError as exc:
                # An event without its statuses is no event to the kubelet.
                self._end_all(Unavailable(
                    f"cannot read the statuses of a {event_type} event of {container_id[:12]} ({exc.message}); relist"
                ))
                return
            with self._lock:
                subscriptions = list(self._subscriptions)
            for subscription in subscriptions:
                if subscription.offer(event):
                    self.delivered += 1
                    continue
                self.cut_off += 1
                self.unsubscribe(subscription)
                subscription.end(ResourceExhausted(
                    f"GetContainerEvents reader fell {subscription.queue.maxsize} events behind "
                    "(events.subscriber_queue) and was cut off; relist and subscribe again"
                ))


_hubs: dict[int, EventHub] = {}
_hubs_lock = threading.Lock()


def hub_for(gateway: Gateway, start: bool = True) -> EventHub | None:
    """The gateway's hub, started by the first GetContainerEvents."""
    with _hubs_lock:
        hub = _hubs.get(id(gateway))
        if hub is None and start:
            hub = _hubs[id(gateway)] = EventHub(gateway)
        return hub


def publish_sandbox_event(gateway: Gateway, event_type: str, sandbox_id: str,
                          sandbox_status: api_pb2.PodSandboxStatus | None = None) -> None:
    """A sandbox's own event, from crigw's sandbox handlers; free when nobody listens."""
    hub = hub_for(gateway, start=False)
    if hub is None or not hub.has_subscribers:
        return
    hub.dispatch(event_type, sandbox_id, sandbox_id, time.time_ns(), sandbox_status)


def remember_sandbox(gateway: Gateway, status: api_pb2.PodSandboxStatus) -> None:
    hub = hub_for(gateway, start=False)
    if hub is not None:
        hub.remember_sandbox(status)


def open_streams(gateway: Gateway) -> int:
    """GetContainerEvents streams open now (they count as CRI calls in flight)."""
    hub = hub_for(gateway, start=False)
    return 0 if hub is None else hub.stream_count


def wants_sandbox_events(gateway: Gateway) -> bool:
    hub = hub_for(gateway, start=False)
    return hub is not None and hub.has_subscribers


@cri_handler("GetContainerEvents")
def get_container_events(gateway: Gateway, request: api_pb2.GetEventsRequest) -> Iterator[api_pb2.ContainerEventResponse]:
    context = current_context()
    hub = hub_for(gateway)
    assert hub is not None
    subscription = hub.subscribe(context)
    # Headers now, before any event: a client that has them knows every
    # later event reaches it.
    context.send_initial_metadata(())
    return _stream(hub, subscription, context)


def _stream(hub: EventHub, subscription: Subscription, context: Any) -> Iterator[api_pb2.ContainerEventResponse]:
    try:
        while True:
            try:
                event = subscription.queue.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    return
                if subscription.ended is not None:
                    break
                continue
            if event is None:
                break
            # Events queued before the stream was ended were received whole:
            # they still go out, then the status that ends the stream.
            yield event
    finally:
        hub.unsubscribe(subscription)
    error = subscription.ended or Unavailable("container events stream ended")
    log.info("container events stream ended", extra={"code": error.kind, "reason": error.message})
    context.abort(grpc_code_for(error), bounded_message(error.message))
