"""The port-forward protocol (`portforward.k8s.io`) the kubelet's streaming library speaks.

Over SPDY the client opens, for every forwarded connection, an `error` and
a `data` stream carrying the same `port` and `requestID` headers; once both
are there the server connects to the port and relays the data stream. A
failure is written as text on the error stream. Over WebSocket the ports
come from the request and each gets two channels (data, error), each of
which first carries the port number as two little-endian bytes.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from services.crigw.streaming.remotecommand import STREAM_TYPE_HEADER, Stream

log = logging.getLogger("pyrio.crigw.streaming.portforward")

PROTOCOL = "portforward.k8s.io"
PORT_HEADER = "port"
REQUEST_ID_HEADER = "requestid"
DATA, ERROR = "data", "error"

# Connects to a port of the pod; raises OSError with a message for the client.
Dialer = Callable[[int], socket.socket]


def parse_port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {text!r} must be between 1 and 65535")
    return port


def relay(data: Stream, error: Stream, port: int, dial: Dialer, describe: str) -> None:
    """Connect to `port` and copy bytes both ways until the pod side closes."""
    try:
        try:
            conn = dial(port)
        except OSError as exc:
            message = f"error forwarding port {port} to pod {describe}: {exc}"
            log.info(message)
            try:
                error.write(message.encode())
            except OSError:
                pass
            return
        with conn:
            def client_to_pod() -> None:
                try:
                    while chunk := data.read():
                        conn.sendall(chunk)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            upstream = threading.Thread(target=client_to_pod, name=f"pf-{port}-in", daemon=True)
            upstream.start()
            try:
                while chunk := conn.recv(65536):
                    data.write(chunk)
            except OSError:
                pass
    finally:
        data.close()
        error.close()


@dataclass
class _Pair:
    created: float
    streams: dict[str, Stream] = field(default_factory=dict)


class SpdyPortForward:
    """Pairs up the client's streams by requestID and relays each complete pair."""

    def __init__(self, dial: Dialer, describe: str, creation_timeout: float, max_connections: int) -> None:
        self._dial = dial
        self._describe = describe
        self._creation_timeout = creation_timeout
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._pending: dict[str, _Pair] = {}
        self.threads: list[threading.Thread] = []

    def on_stream(self, stream: Stream) -> str | None:
        port_text = stream.header(PORT_HEADER)
        if not port_text:
            return f"{PORT_HEADER!r} header is required"
        try:
            port = parse_port(port_text)
        except ValueError as exc:
            return f"unable to parse {port_text!r} as a port: {exc}"
        stream_type = stream.header(STREAM_TYPE_HEADER)
        if stream_type not in (DATA, ERROR):
            return f"invalid stream type {stream_type!r}"
        request_id = stream.header(REQUEST_ID_HEADER)
        if not request_id:
            # Old clients send no requestID: the pair is (error n, data n+2).
            request_id = str(stream.id if stream_type == ERROR else stream.id - 2)
        with self._lock:
            self.threads = [thread for thread in self.threads if thread.is_alive()]
            if request_id not in self._pending and len(self.threads) + len(self._pending) >= self._max_connections:
                return f"too many forwarded connections at once (at most {self._max_connections})"
            pair = self._pending.setdefault(request_id, _Pair(created=time.monotonic()))
            if stream_type in pair.streams:
                return f"duplicate {stream_type} stream for request {request_id}"
            pair.streams[stream_type] = stream
            complete = len(pair.streams) == 2
            if complete:
                del self._pending[request_id]
        if complete:
            thread = threading.Thread(
                target=relay,
                args=(pair.streams[DATA], pair.streams[ERROR], port, self._dial, self._describe),
                name=f"pf-{port}",
                daemon=True,
            )
            with self._lock:
                self.threads.append(thread)
            thread.start()
        return None

    def expire_incomplete(self) -> None:
        """A pair whose second stream never came: tell the client on the one it opened."""
        now = time.monotonic()
        with self._lock:
            expired = [key for key, pair in self._pending.items() if now - pair.created > self._creation_timeout]
            pairs = [self._pending.pop(key) for key in expired]
        for pair in pairs:
            for kind, stream in pair.streams.items():
                try:
                    if kind == ERROR:
                        stream.write(b"timed out waiting for streams")
                    stream.close()
                except OSError:
                    pass


def websocket_port_prefix(port: int) -> bytes:
    return struct.pack("<H", port)
