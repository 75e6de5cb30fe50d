"""Events between pyrio's services: ZeroMQ PUB/SUB beside the RPC layer.

A publisher (shimd) binds `ipc://<run_dir>/rpc/<service>-events.sock` and
sends one msgpack map per event:
  {"epoch": str, "seq": int, "kind": str, ...payload}
`epoch` is new at every start of the publishing process and `seq` counts
from 1 within it. Every HEARTBEAT_SECONDS it also sends
{"epoch", "seq": <last seq>, "kind": "heartbeat"}, so a subscriber learns of
an event it missed (a dropped message, the last one before a crash) within
one heartbeat, and of a publisher that died without a disconnect in
SILENCE_SECONDS.

PUB/SUB drops rather than blocks: a publisher never waits for a subscriber.
What a subscriber must do instead is notice, and `EventSubscriber` does:
it reports a `Gap` (with why) whenever the epoch changes, a sequence number
is skipped, the connection drops, or the publisher falls silent. Consumers
that promise "delivered or told" (crigw's GetContainerEvents) end their
streams then: nothing is ever lost silently.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq

from common import state
from common.config import Config
from common.rpc import pack, unpack

log = logging.getLogger("pyrio.events")

HEARTBEAT_SECONDS = 0.5
# A publisher that sent nothing for this long is taken for gone.
SILENCE_SECONDS = 2.5
# Far above any burst (a pod's worth of containers exiting at once), so a
# drop means a stuck subscriber, which the sequence numbers then reveal.
SEND_HIGH_WATER_MARK = 100_000


def events_endpoint(config: Config, service: str) -> str:
    return f"ipc://{Path(config.pyrio.run_dir) / 'rpc' / service}-events.sock"


class EventPublisher:
    """Publishes numbered events; thread safe (one lock orders seq and send)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.epoch = uuid.uuid4().hex
        self._seq = 0
        self._lock = threading.Lock()
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
        if endpoint.startswith("ipc://"):
            state.private_dir(Path(endpoint[len("ipc://") :]).parent)
        self._socket.bind(endpoint)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="events-heartbeat", daemon=True)
        self._heartbeat.start()

    @property
    def seq(self) -> int:
        return self._seq

    def publish(self, kind: str, payload: dict[str, Any]) -> int:
        """Send one event; its sequence number."""
        with self._lock:
            self._seq += 1
            self._send({**payload, "kind": kind, "epoch": self.epoch, "seq": self._seq})
            return self._seq

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._socket.send(pack(message), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # past the high-water mark: subscribers see the gap in seq

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                if self._stop.is_set():
                    return
                self._send({"kind": "heartbeat", "epoch": self.epoch, "seq": self._seq})

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._socket.close(0)


@dataclass
class Gap:
    """Events may have been missed: why."""

    reason: str


class EventSubscriber:
    """Receives a publisher's events on a thread of its own.

    `on_event(message)` gets every event in order; `on_gap(Gap)` is called
    whenever events may have been missed since the last one delivered.
    `synced` says whether the publisher is heard right now (a new consumer
    that joins while it is not cannot be promised anything).
    """

    def __init__(
        self,
        endpoint: str,
        service: str,
        on_event: Callable[[dict[str, Any]], None],
        on_gap: Callable[[Gap], None],
    ) -> None:
        self.endpoint = endpoint
        self.service = service
        self._on_event = on_event
        self._on_gap = on_gap
        self._epoch = ""
        self._seq = 0
        self._last_heard = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{service}-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def epoch(self) -> str:
        """The epoch of the publisher heard now ("" when none is)."""
        return self._epoch

    @property
    def synced(self) -> bool:
        return bool(self._epoch) and time.monotonic() - self._last_heard < SILENCE_SECONDS

    def _gap(self, reason: str) -> None:
        log.warning("events may have been missed", extra={"publisher": self.service, "reason": reason})
        self._on_gap(Gap(reason))

    def _run(self) -> None:
        context = zmq.Context.instance()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, SEND_HIGH_WATER_MARK)
        sub.setsockopt(zmq.RECONNECT_IVL, 50)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sub.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(int(HEARTBEAT_SECONDS * 1000)))
                if monitor in ready:
                    monitor.recv_multipart()
                    # Take what arrived before the disconnect first.
                    while sub.poll(0):
                        self._receive(unpack(sub.recv(zmq.NOBLOCK)))
                    if self._epoch:
                        self._epoch = ""
                        self._gap(f"{self.service} disconnected (restarting?)")
                    continue
                if sub in ready:
                    self._receive(unpack(sub.recv(zmq.NOBLOCK)))
                elif self._epoch and time.monotonic() - self._last_heard >= SILENCE_SECONDS:
                    self._epoch = ""
                    self._gap(f"{self.service} sent nothing for {SILENCE_SECONDS}s")
        finally:
            sub.disable_monitor()
            monitor.close(0)
            sub.close(0)

    def _receive(self, message: dict[str, Any]) -> None:
        epoch, seq = str(message.get("epoch", "")), int(message.get("seq", 0))
        self._last_heard = time.monotonic()
        heartbeat = message.get("kind") == "heartbeat"
        if epoch != self._epoch:
            if self._epoch:
                self._gap(f"{self.service} restarted")
            self._epoch = epoch
            # Joining a publisher: its history before now is not ours to miss.
            self._seq = seq if heartbeat else seq - 1
        expected = self._seq if heartbeat else self._seq + 1
        if seq != expected:
            self._gap(f"{self.service} events {self._seq + 1}..{seq} were not received")
        self._seq = seq
        if not heartbeat:
            self._on_event(message)
