"""RFC 6455 WebSocket, server side, with the Kubernetes channel framing.

`channel.k8s.io` (and `v4.`, `v5.` prefixed): every binary message starts
with one byte naming the channel (0 stdin, 1 stdout, 2 stderr, 3 error,
4 resize for remotecommand; data/error pairs for port-forward).
`base64.channel.k8s.io`: text messages, the channel as an ASCII digit and
the payload base64. `v5.channel.k8s.io` adds the close signal: the message
[255, channel] half-closes that channel (how a client says stdin EOF).
`SPDY/3.1+portforward.k8s.io` carries a whole SPDY port-forward session.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import struct
import threading
import time
from typing import BinaryIO

from services.crigw.streaming.spdy import STREAM_BUFFER_LIMIT, close_after_peer, read_exactly

log = logging.getLogger("pyrio.crigw.streaming.websocket")

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009

STREAM_CLOSE = 255
# A client message bigger than this closes the connection (1009).
MAX_MESSAGE = 16 * 1024 * 1024

BINARY_PROTOCOLS = ("", "channel.k8s.io", "v4.channel.k8s.io", "v5.channel.k8s.io")
BASE64_PROTOCOLS = ("base64.channel.k8s.io", "v4.base64.channel.k8s.io")
# portforward.k8s.io's SPDY, tunnelled in binary messages (client-go's tunneling dialer).
TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key.strip() + GUID).encode()).digest()).decode()


def offered_protocols(header: str) -> list[str]:
    return [part.strip() for part in header.split(",") if part.strip()]


def choose_protocol(offered: list[str], supported: tuple[str, ...]) -> str | None:
    """The client's first supported choice; "" when it offered none; None if no match."""
    if not offered:
        return "" if "" in supported else None
    for protocol in offered:
        if protocol in supported:
            return protocol
    return None


def encode_frame(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        head = struct.pack(">BB", 0x80 | opcode, length)
    elif length < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 126, length)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127, length)
    return head + payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    # XOR eight bytes at a time through int arithmetic: fast enough for MB/s.
    repeat = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeat, "big")).to_bytes(len(payload), "big")


class ChannelStream:
    """One channel of a channel.k8s.io connection, shaped like a SpdyStream."""

    def __init__(self, connection: "ChannelConnection", number: int, readable: bool, writable: bool) -> None:
        self.connection = connection
        self.id = number
        self.readable = readable
        self.writable = writable
        self.headers: dict[str, list[str]] = {}
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._remote_closed = not readable

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def read(self, max_bytes: int = 65536) -> bytes:
        with self._cond:
            while not self._buffer and not self._remote_closed:
                self._cond.wait()
            data = bytes(self._buffer[:max_bytes])
            del self._buffer[:max_bytes]
            self._cond.notify_all()
            return data

    def _deliver(self, data: bytes) -> None:
        with self._cond:
            while len(self._buffer) > STREAM_BUFFER_LIMIT and not self.connection.closed.is_set():
                self._cond.wait(1.0)
            if not self._remote_closed:
                self._buffer += data
            self._cond.notify_all()

    def _close_remote(self) -> None:
        with self._cond:
            self._remote_closed = True
            self._cond.notify_all()

    def write(self, data: bytes) -> None:
        if self.writable:
            self.connection.send_channel(self.id, data)

    def close(self) -> None:
        # The protocols have no server-to-client half-close; the connection's
        # close ends every channel.
        pass

    def reset(self, status: int = 0) -> None:
        self._close_remote()


class WebSocket:
    """Framing of one upgraded connection: data messages in, frames out, pings and close handled."""

    def __init__(self, sock: socket.socket, reader: BinaryIO) -> None:
        self.sock = sock
        self._reader = reader
        self._write_lock = threading.Lock()
        self.closed = threading.Event()
        self._close_sent = False
        self.last_activity = time.monotonic()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self.closed.is_set() and opcode != OP_CLOSE:
            raise BrokenPipeError("connection closed")
        frame = encode_frame(opcode, payload)
        with self._write_lock:
            self.sock.sendall(frame)
        self.last_activity = time.monotonic()

    def _read_message(self) -> bytes | None:
        """The next complete data message; control frames are handled here."""
        parts: list[bytes] = []
        size = 0
        while True:
            first, second = read_exactly(self._reader, 2)
            fin, opcode = first & 0x80, first & 0x0F
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", read_exactly(self._reader, 2))
            elif length == 127:
                (length,) = struct.unpack(">Q", read_exactly(self._reader, 8))
            if not second & 0x80:
                self._fail(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
                return None
            mask = read_exactly(self._reader, 4)
            if length > MAX_MESSAGE or size + length > MAX_MESSAGE:
                self._fail(CLOSE_TOO_BIG, "message too big")
                return None
            payload = _unmask(read_exactly(self._reader, length), mask) if length else b""
            self.last_activity = time.monotonic()
            if opcode == OP_PING:
                self._send_frame(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                self._send_close(CLOSE_NORMAL)
                return None
            parts.append(payload)
            size += length
            if fin:
                return b"".join(parts)

    def _send_close(self, code: int, reason: str = "") -> None:
        if self._close_sent:
            return
        self._close_sent = True
        try:
            self._send_frame(OP_CLOSE, struct.pack(">H", code) + reason.encode()[:120])
        except OSError:
            pass

    def _fail(self, code: int, reason: str) -> None:
        log.warning("closing WebSocket: %s", reason)
        self._send_close(code, reason)


class ChannelConnection(WebSocket):
    """The server end of one upgraded WebSocket speaking channel.k8s.io."""

    def __init__(self, sock: socket.socket, reader: BinaryIO, protocol: str, channels: list[tuple[bool, bool]]) -> None:
        super().__init__(sock, reader)
        self.protocol = protocol
        self.base64 = protocol in BASE64_PROTOCOLS
        self.supports_close = protocol == "v5.channel.k8s.io"
        self.channels = [ChannelStream(self, number, read, write) for number, (read, write) in enumerate(channels)]

    def send_channel(self, number: int, data: bytes) -> None:
        if self.base64:
            self._send_frame(OP_TEXT, bytes([ord("0") + number]) + base64.b64encode(data))
        else:
            self._send_frame(OP_BINARY, bytes([number]) + data)

    # --- the read loop -------------------------------------------------

    def serve(self) -> None:
        try:
            while not self.closed.is_set():
                message = self._read_message()
                if message is None:
                    break
                self._on_message(message)
        except (EOFError, OSError, ValueError):
            pass
        finally:
            self._shutdown()

    def _on_message(self, message: bytes) -> None:
        if not message:
            return
        if self.supports_close and message[0] == STREAM_CLOSE:
            if len(message) == 2 and message[1] < len(self.channels):
                self.channels[message[1]]._close_remote()
            return
        number = message[0] - ord("0") if self.base64 else message[0]
        if not 0 <= number < len(self.channels):
            return
        data = message[1:]
        if self.base64:
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError:
                log.info("dropping a message with invalid base64 on channel %d", number)
                return
        channel = self.channels[number]
        if channel.readable:
            channel._deliver(data)

    # --- closing ---------------------------------------------------------

    def _shutdown(self) -> None:
        self.closed.set()
        for channel in self.channels:
            channel._close_remote()

    def close(self, linger: float = 2.0) -> None:
        """Close frame, then wait for the client's close (or `linger`)."""
        self._send_close(CLOSE_NORMAL)
        close_after_peer(self.sock, self.closed, linger)
        self._shutdown()


class TunnelConnection(WebSocket):
    """SPDY carried in binary WebSocket messages (`SPDY/3.1+portforward.k8s.io`).

    Newer kubectl and crictl port-forward over WebSocket this way: the
    WebSocket replaces the HTTP upgrade and its binary messages carry the
    SPDY byte stream. This object is the socket and the reader a
    SpdyConnection runs on.
    """

    def __init__(self, sock: socket.socket, reader: BinaryIO) -> None:
        super().__init__(sock, reader)
        self._pending = b""

    def read(self, count: int) -> bytes:
        """Exactly `count` bytes of the tunnelled stream, fewer only at its end."""
        while len(self._pending) < count and not self.closed.is_set():
            message = self._read_message()
            if message is None:
                self.closed.set()
                break
            self._pending += message
        data, self._pending = self._pending[:count], self._pending[count:]
        return data

    def sendall(self, data: bytes) -> None:
        self._send_frame(OP_BINARY, data)

    def shutdown(self, how: int) -> None:
        if how == socket.SHUT_WR:
            self._send_close(CLOSE_NORMAL)
        else:
            self.sock.shutdown(how)
