"""SPDY/3.1 framing, server side, as the Kubernetes streaming clients speak it.

kubectl, crictl and the kubelet use moby/spdystream over golang's SPDY/3
framer: the client opens every stream (SYN_STREAM with its headers), the
server answers each with an empty SYN_REPLY, data flows in DATA frames and a
side is closed by a DATA frame with FLAG_FIN. Header blocks are zlib
compressed with the SPDY/3 dictionary, one compression context per direction
for the whole connection. spdystream implements no flow control, so
WINDOW_UPDATE and SETTINGS are read and ignored and never sent.

Reads of one connection happen on one thread (`serve`), which hands data to
per-stream buffers; a full buffer blocks that thread, which pushes back on the
client through TCP exactly as spdystream's unbuffered channels do.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import zlib
from typing import BinaryIO, Callable

log = logging.getLogger("pyrio.crigw.streaming.spdy")

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6

GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1

MAX_DATA_LENGTH = (1 << 24) - 1
# Outgoing DATA frames are cut to this size so one busy stream cannot hold
# the connection's write lock for long.
WRITE_CHUNK = 64 * 1024
# Bytes a stream buffers from the client before the read loop waits for the
# stream's consumer.
STREAM_BUFFER_LIMIT = 4 * 1024 * 1024
# How long a writer waits for its stream's SYN_REPLY to go out (it follows at once).
REPLY_WAIT_SECONDS = 10.0
# A control frame bigger than this is a protocol error (header blocks are tiny).
MAX_CONTROL_LENGTH = 1 << 20


def _dictionary() -> bytes:
    """The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1)."""
    words = (
        "options head post put delete trace accept accept-charset accept-encoding accept-language "
        "accept-ranges age allow authorization cache-control connection content-base content-encoding "
        "content-language content-length content-location content-md5 content-range content-type date "
        "etag expect expires from host if-match if-modified-since if-none-match if-range "
        "if-unmodified-since last-modified location max-forwards pragma proxy-authenticate "
        "proxy-authorization range referer retry-after server te trailer transfer-encoding upgrade "
        "user-agent vary via warning www-authenticate method get status"
    ).split()
    words += ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
    prefix = b"".join(struct.pack(">I", len(word)) + word.encode() for word in words)
    tail = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
        "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
        "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
        "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
        "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    return prefix + tail.encode()


HEADER_DICTIONARY = _dictionary()

Headers = dict[str, list[str]]


class ProtocolError(Exception):
    pass


def encode_header_block(headers: Headers) -> bytes:
    """The uncompressed name/value block: names lowercase, values NUL-joined."""
    parts = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        name_bytes = name.lower().encode()
        value_bytes = "\x00".join(values).encode()
        parts += [struct.pack(">I", len(name_bytes)), name_bytes, struct.pack(">I", len(value_bytes)), value_bytes]
    return b"".join(parts)


def decode_header_block(block: bytes) -> Headers:
    headers: Headers = {}
    try:
        (count,) = struct.unpack_from(">I", block, 0)
        offset = 4
        for _ in range(count):
            (length,) = struct.unpack_from(">I", block, offset)
            name = block[offset + 4 : offset + 4 + length].decode("latin-1").lower()
            offset += 4 + length
            (length,) = struct.unpack_from(">I", block, offset)
            value = block[offset + 4 : offset + 4 + length].decode("utf-8", "replace")
            offset += 4 + length
            headers.setdefault(name, []).extend(value.split("\x00"))
    except struct.error as exc:
        raise ProtocolError(f"truncated header block: {exc}") from None
    return headers


class HeaderCompressor:
    """One direction's zlib context; it lives as long as the connection."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, HEADER_DICTIONARY)

    def compress(self, headers: Headers) -> bytes:
        return self._deflate.compress(encode_header_block(headers)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(zdict=HEADER_DICTIONARY)

    def decompress(self, data: bytes) -> Headers:
        try:
            return decode_header_block(self._inflate.decompress(data))
        except zlib.error as exc:
            raise ProtocolError(f"bad compressed header block: {exc}") from None


def control_frame(frame_type: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, data: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


def read_exactly(reader: BinaryIO, count: int) -> bytes:
    data = reader.read(count)
    if data is None or len(data) < count:
        raise EOFError("connection closed")
    return data


class SpdyStream:
    """One client-created stream: a byte pipe each way with half-close."""

    def __init__(self, connection: "SpdyConnection", stream_id: int, headers: Headers, remote_closed: bool) -> None:
        self.connection = connection
        self.id = stream_id
        self.headers = headers
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._remote_closed = remote_closed
        self._local_closed = False
        self._reset = False
        # Set once our SYN_REPLY is on the wire: spdystream drops DATA on a
        # stream it has no reply for, so nothing may be sent before it (the
        # role of apimachinery's replySent channel).
        self.replied = threading.Event()

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    # --- reading: data the client sent --------------------------------

    def read(self, max_bytes: int = 65536) -> bytes:
        """Up to max_bytes; b"" once the client closed its side (or the stream died)."""
        with self._cond:
            while not self._buffer and not (self._remote_closed or self._reset):
                self._cond.wait()
            data = bytes(self._buffer[:max_bytes])
            del self._buffer[:max_bytes]
            self._cond.notify_all()
            return data

    def _deliver(self, data: bytes, fin: bool) -> None:
        with self._cond:
            while len(self._buffer) > STREAM_BUFFER_LIMIT and not (self._reset or self.connection.closed.is_set()):
                self._cond.wait(1.0)
            if not self._reset and not self._remote_closed:
                self._buffer += data
            if fin:
                self._remote_closed = True
            self._cond.notify_all()

    def _abort(self) -> None:
        with self._cond:
            self._reset = True
            self._local_closed = True
            self._cond.notify_all()
        self.replied.set()  # wakes writers, who then see the reset

    # --- writing: data for the client ----------------------------------

    def _wait_replied(self) -> None:
        if not self.replied.wait(REPLY_WAIT_SECONDS) or self._reset:
            raise BrokenPipeError(f"stream {self.id} is not open")

    def write(self, data: bytes) -> None:
        if self._local_closed:
            raise BrokenPipeError(f"stream {self.id} is closed")
        self._wait_replied()
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            self.connection.send(data_frame(self.id, 0, bytes(view[start : start + WRITE_CHUNK])))

    def close(self) -> None:
        """Half-close: no more data from us (DATA frame with FLAG_FIN)."""
        if self._local_closed:
            return
        self._local_closed = True
        try:
            self._wait_replied()
            self.connection.send(data_frame(self.id, FLAG_FIN, b""))
        except OSError:
            pass
        if self._remote_closed:
            self.connection.forget(self.id)

    def reset(self, status: int = CANCEL) -> None:
        if self._reset:
            return
        self._abort()
        try:
            self.connection.send(control_frame(RST_STREAM, 0, struct.pack(">II", self.id, status)))
        except OSError:
            pass


# Called for every new stream before its SYN_REPLY: return None to accept it
# or a reason to refuse it with RST_STREAM (as apimachinery's newStreamHandler).
StreamHandler = Callable[[SpdyStream], "str | None"]


class SpdyConnection:
    """The server end of one upgraded connection."""

    def __init__(self, sock: socket.socket, reader: BinaryIO, on_stream: StreamHandler) -> None:
        self.sock = sock
        self._reader = reader
        self._on_stream = on_stream
        self._write_lock = threading.Lock()
        self._compressor = HeaderCompressor()
        self._decompressor = HeaderDecompressor()
        self._streams: dict[int, SpdyStream] = {}
        self._last_stream_id = 0
        self.closed = threading.Event()
        self.last_activity = time.monotonic()

    # --- sending ---------------------------------------------------------

    def send(self, frame: bytes) -> None:
        if self.closed.is_set():
            raise BrokenPipeError("connection closed")
        with self._write_lock:
            self.sock.sendall(frame)
        self.last_activity = time.monotonic()

    def _reply(self, stream_id: int) -> None:
        # Compression and sending happen under one lock: the peer inflates
        # header blocks in the order it receives them.
        with self._write_lock:
            block = self._compressor.compress({})
            self.sock.sendall(control_frame(SYN_REPLY, 0, struct.pack(">I", stream_id) + block))
        self.last_activity = time.monotonic()

    # --- the read loop -------------------------------------------------

    def serve(self) -> None:
        """Read frames until the client goes away; then every stream reads EOF."""
        try:
            while not self.closed.is_set():
                self._read_frame()
        except (EOFError, OSError, ValueError):
            pass
        except (ProtocolError, struct.error) as exc:
            log.warning("SPDY protocol error, closing the connection: %s", exc)
            self.go_away(GOAWAY_PROTOCOL_ERROR)
        finally:
            self._shutdown()

    def _read_frame(self) -> None:
        head = read_exactly(self._reader, 8)
        first, flags_length = struct.unpack(">II", head)
        flags, length = flags_length >> 24, flags_length & 0xFFFFFF
        self.last_activity = time.monotonic()
        if not first & 0x80000000:
            data = read_exactly(self._reader, length) if length else b""
            stream = self._streams.get(first & 0x7FFFFFFF)
            if stream is not None:
                stream._deliver(data, bool(flags & FLAG_FIN))
                if flags & FLAG_FIN and stream._local_closed:
                    self.forget(stream.id)
            return
        version, frame_type = (first >> 16) & 0x7FFF, first & 0xFFFF
        if length > MAX_CONTROL_LENGTH:
            raise ProtocolError(f"control frame of {length} bytes")
        payload = read_exactly(self._reader, length) if length else b""
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version}, expected {VERSION}")
        if frame_type == SYN_STREAM:
            self._on_syn_stream(flags, payload)
        elif frame_type == RST_STREAM:
            stream_id, _status = struct.unpack(">II", payload[:8])
            stream = self._streams.pop(stream_id & 0x7FFFFFFF, None)
            if stream is not None:
                stream._abort()
        elif frame_type == PING:
            # Client pings have odd ids; echo them back unchanged.
            if struct.unpack(">I", payload[:4])[0] % 2 == 1:
                self.send(control_frame(PING, 0, payload[:4]))
        elif frame_type == GOAWAY:
            raise EOFError("client sent GOAWAY")
        elif frame_type in (SYN_REPLY, HEADERS):
            # Still inflate the block: the compression context is shared.
            self._decompressor.decompress(payload[4:])
        # SETTINGS, WINDOW_UPDATE and unknown types: spdystream ignores them too.

    def _on_syn_stream(self, flags: int, payload: bytes) -> None:
        if len(payload) < 10:
            raise ProtocolError("short SYN_STREAM")
        stream_id = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
        headers = self._decompressor.decompress(payload[10:])
        if stream_id % 2 == 0 or stream_id <= self._last_stream_id:
            self._send_reset(stream_id, PROTOCOL_ERROR)
            return
        self._last_stream_id = stream_id
        stream = SpdyStream(self, stream_id, headers, remote_closed=bool(flags & FLAG_FIN))
        reason = self._on_stream(stream)
        if reason is not None:
            log.info("refusing stream %d: %s", stream_id, reason)
            self._send_reset(stream_id, REFUSED_STREAM)
            return
        self._streams[stream_id] = stream
        self._reply(stream_id)
        stream.replied.set()

    def forget(self, stream_id: int) -> None:
        """Drop a stream closed both ways (a long port-forward session opens many)."""
        self._streams.pop(stream_id, None)

    def _send_reset(self, stream_id: int, status: int) -> None:
        self.send(control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, status)))

    # --- closing ---------------------------------------------------------

    def go_away(self, status: int = GOAWAY_OK) -> None:
        try:
            self.send(control_frame(GOAWAY, 0, struct.pack(">II", self._last_stream_id, status)))
        except OSError:
            pass

    def _shutdown(self) -> None:
        self.closed.set()
        for stream in list(self._streams.values()):
            stream._abort()
        self._streams.clear()

    def close(self, linger: float = 2.0) -> None:
        """GOAWAY, then close once the client hung up (or after `linger`).

        Closing while the client's bytes are still unread would make the
        kernel answer with a reset, and the client could lose the exit status
        it has not read yet; so we half-close and let the client go first.
        """
        if not self.closed.is_set():
            self.go_away()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        close_after_peer(self.sock, self.closed, linger)
        self._shutdown()


def close_after_peer(sock: socket.socket, peer_gone: threading.Event, linger: float) -> None:
    """Wait up to `linger` for the client to hang up (its read loop sets peer_gone), then shut the socket."""
    peer_gone.wait(linger)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
