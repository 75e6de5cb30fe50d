"""A streaming client for tests: SPDY/3.1 and WebSocket, the way kubectl and the kubelet speak them.

Written from the protocol descriptions (SPDY draft 3, RFC 6455, the
Kubernetes remotecommand and portforward protocols) and deliberately shares
no code with services/crigw/streaming, so a framing mistake on either side
shows up as a failure instead of cancelling out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import socket
import ssl
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# --- SPDY/3 header dictionary, written out as in the draft ------------------------

_SPDY3_NAMES = [
    b"options", b"head", b"post", b"put", b"delete", b"trace", b"accept", b"accept-charset",
    b"accept-encoding", b"accept-language", b"accept-ranges", b"age", b"allow", b"authorization",
    b"cache-control", b"connection", b"content-base", b"content-encoding", b"content-language",
    b"content-length", b"content-location", b"content-md5", b"content-range", b"content-type",
    b"date", b"etag", b"expect", b"expires", b"from", b"host", b"if-match", b"if-modified-since",
    b"if-none-match", b"if-range", b"if-unmodified-since", b"last-modified", b"location",
    b"max-forwards", b"pragma", b"proxy-authenticate", b"proxy-authorization", b"range", b"referer",
    b"retry-after", b"server", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"user-agent",
    b"vary", b"via", b"warning", b"www-authenticate", b"method", b"get", b"status", b"200 OK",
    b"version", b"HTTP/1.1", b"url", b"public", b"set-cookie", b"keep-alive", b"origin",
]
_SPDY3_TAIL = (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    b"401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    b"503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    b"Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    b"application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    b"gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
SPDY3_DICTIONARY = b"".join(len(name).to_bytes(4, "big") + name for name in _SPDY3_NAMES) + _SPDY3_TAIL
# The dictionary id every SPDY/3 implementation (Chromium's kV3DictionaryId, Go's framer) agrees on.
assert zlib.adler32(SPDY3_DICTIONARY) == 0xE3C6A7C2 and len(SPDY3_DICTIONARY) == 1423


class UpgradeRefused(Exception):
    def __init__(self, status: int, headers: dict[str, list[str]], body: bytes) -> None:
        super().__init__(f"upgrade refused: HTTP {status}: {body.decode(errors='replace').strip()}")
        self.status = status
        self.headers = headers
        self.body = body


def _connect(url: str, timeout: float = 10.0) -> tuple[socket.socket, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    sock = socket.create_connection((parts.hostname, port), timeout=timeout)
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock, server_hostname=parts.hostname)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return sock, path


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = sock.recv(count)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _read_response_head(sock: socket.socket) -> tuple[int, dict[str, list[str]], bytes]:
    """Status, headers, and whatever body bytes followed (for a refusal)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if status != 101:
        length = int(headers.get("content-length", ["0"])[0])
        while len(rest) < length:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
    return status, headers, rest


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    sock, path = _connect(url)
    with sock:
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall((request + "\r\n").encode())
        status, _, body = _read_response_head(sock)
        return status, body


# --- SPDY client -----------------------------------------------------------------


class ClientStream:
    def __init__(self, client: "SpdyClient", stream_id: int) -> None:
        self.client = client
        self.id = stream_id
        self.replied = threading.Event()
        self.reset_status: int | None = None
        self.incoming: "queue.Queue[bytes | None]" = queue.Queue()
        self.remote_closed = False

    def write(self, data: bytes) -> None:
        self.client._send(struct.pack(">II", self.id, len(data)) + data)

    def close(self) -> None:
        self.client._send(struct.pack(">II", self.id, 0x01 << 24))

    def read(self, timeout: float = 30.0) -> bytes | None:
        """Next chunk, b'' at FIN/reset; None on timeout."""
        if self.remote_closed:
            return b""
        try:
            chunk = self.incoming.get(timeout=timeout)
        except queue.Empty:
            return None
        if chunk is None:
            self.remote_closed = True
            return b""
        return chunk

    def read_all(self, timeout: float = 30.0) -> bytes:
        out = b""
        while (chunk := self.read(timeout)) is not None and chunk:
            out += chunk
        return out


class SpdyClient:
    """SPDY/3.1 client over an upgraded HTTP connection, as spdystream's client side."""

    def __init__(self, url: str, protocols: list[str], method: str = "POST", extra_headers: dict[str, str] | None = None) -> None:
        self.sock, path = _connect(url)
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: Upgrade", "Upgrade: SPDY/3.1"]
        lines += [f"X-Stream-Protocol-Version: {protocol}" for protocol in protocols]
        lines += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status, headers, body = _read_response_head(self.sock)
        if status != 101:
            self.sock.close()
            raise UpgradeRefused(status, headers, body)
        assert body == b"", "server sent frames before any stream"
        self.protocol = headers.get("x-stream-protocol-version", [""])[0]
        self.sock.settimeout(None)
        self._deflate = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, SPDY3_DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
        self._lock = threading.Lock()
        self._next_id = 1
        self.streams: dict[int, ClientStream] = {}
        self.goaway = threading.Event()
        self.closed = threading.Event()
        self.pongs: "queue.Queue[int]" = queue.Queue()
        threading.Thread(target=self._read_loop, daemon=True).start()

    def _send(self, frame: bytes) -> None:
        with self._lock:
            self.sock.sendall(frame)

    def _header_block(self, headers: dict[str, str]) -> bytes:
        raw = struct.pack(">I", len(headers))
        for name, value in headers.items():
            raw += struct.pack(">I", len(name)) + name.lower().encode() + struct.pack(">I", len(value)) + value.encode()
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def create_stream(self, headers: dict[str, str], timeout: float = 10.0) -> ClientStream:
        with self._lock:
            stream_id = self._next_id
            self._next_id += 2
            stream = ClientStream(self, stream_id)
            self.streams[stream_id] = stream
            body = struct.pack(">IIBB", stream_id, 0, 0, 0) + self._header_block(headers)
            self.sock.sendall(struct.pack(">HHI", 0x8003, 1, len(body)) + body)
        if not stream.replied.wait(timeout):
            raise TimeoutError(f"no SYN_REPLY for stream {stream_id}")
        if stream.reset_status is not None:
            raise ConnectionResetError(f"stream {stream_id} refused with RST_STREAM status {stream.reset_status}")
        return stream

    def ping(self, ping_id: int = 1) -> None:
        self._send(struct.pack(">HHII", 0x8003, 6, 4, ping_id))

    def _read_loop(self) -> None:
        try:
            while True:
                word, flags_len = struct.unpack(">II", _recv_exact(self.sock, 8))
                flags, length = flags_len >> 24, flags_len & 0xFFFFFF
                payload = _recv_exact(self.sock, length) if length else b""
                if word & 0x80000000:
                    assert (word >> 16) & 0x7FFF == 3, "server must speak SPDY version 3"
                    self._on_control(word & 0xFFFF, flags, payload)
                else:
                    stream = self.streams.get(word & 0x7FFFFFFF)
                    assert stream is not None and stream.replied.is_set(), f"DATA on unknown stream {word}"
                    if payload:
                        stream.incoming.put(payload)
                    if flags & 0x01:
                        stream.incoming.put(None)
        except (EOFError, OSError):
            pass
        finally:
            self.closed.set()
            for stream in self.streams.values():
                stream.replied.set()
                stream.incoming.put(None)

    def _on_control(self, frame_type: int, flags: int, payload: bytes) -> None:
        if frame_type == 2:  # SYN_REPLY
            (stream_id,) = struct.unpack(">I", payload[:4])
            self._inflate.decompress(payload[4:])  # keeps the shared inflate context in step
            self.streams[stream_id & 0x7FFFFFFF].replied.set()
            if flags & 0x01:
                self.streams[stream_id].incoming.put(None)
        elif frame_type == 3:  # RST_STREAM
            stream_id, status = struct.unpack(">II", payload)
            stream = self.streams[stream_id]
            stream.reset_status = status
            stream.replied.set()
            stream.incoming.put(None)
        elif frame_type == 6:  # PING
            self.pongs.put(struct.unpack(">I", payload)[0])
        elif frame_type == 7:  # GOAWAY
            self.goaway.set()

    def close(self) -> None:
        try:
            self._send(struct.pack(">HHIII", 0x8003, 7, 8, 0, 0))
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# --- remotecommand over SPDY ------------------------------------------------------


@dataclass
class ExecResult:
    stdout: bytes = b""
    stderr: bytes = b""
    error: bytes = b""
    protocol: str = ""

    @property
    def status(self) -> dict[str, Any]:
        return json.loads(self.error) if self.error else {}

    @property
    def exit_code(self) -> int:
        """As kubectl reads it: 0 on Success, the ExitCode cause otherwise (-1: another failure)."""
        status = self.status
        if status.get("status") == "Success":
            return 0
        for cause in status.get("details", {}).get("causes", []):
            if cause.get("reason") == "ExitCode":
                return int(cause["message"])
        return -1


@dataclass
class RemoteCommand:
    """One exec/attach session: the streams it opened, for tests that drive it step by step."""

    client: SpdyClient
    error: ClientStream
    stdin: ClientStream | None = None
    stdout: ClientStream | None = None
    stderr: ClientStream | None = None
    resize: ClientStream | None = None
    collected: dict[str, bytes] = field(default_factory=lambda: {"stdout": b"", "stderr": b""})

    def send_resize(self, width: int, height: int) -> None:
        assert self.resize is not None
        self.resize.write(json.dumps({"Width": width, "Height": height}).encode() + b"\n")

    def read_stdout_until(self, marker: bytes, timeout: float = 20.0) -> bytes:
        import time

        deadline = time.monotonic() + timeout
        assert self.stdout is not None
        while marker not in self.collected["stdout"]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{marker!r} not seen; got {self.collected['stdout']!r}")
            chunk = self.stdout.read(remaining)
            if chunk is None:
                continue
            if chunk == b"":
                raise EOFError(f"stdout ended before {marker!r}; got {self.collected['stdout']!r}")
            self.collected["stdout"] += chunk
        return self.collected["stdout"]

    def finish(self, timeout: float = 30.0) -> ExecResult:
        """Read outputs to their end and the error stream's status, as the client library does."""
        result = ExecResult(protocol=self.client.protocol)
        outputs: dict[str, bytes] = {}

        def drain(name: str, stream: ClientStream) -> None:
            outputs[name] = stream.read_all(timeout)

        threads = [
            threading.Thread(target=drain, args=(name, stream))
            for name, stream in (("stdout", self.stdout), ("stderr", self.stderr))
            if stream is not None
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
        result.stdout = self.collected["stdout"] + outputs.get("stdout", b"")
        result.stderr = self.collected["stderr"] + outputs.get("stderr", b"")
        result.error = self.error.read_all(timeout)
        self.client.close()
        return result


def open_remote_command(
    url: str,
    stdin: bool = False,
    stdout: bool = True,
    stderr: bool = True,
    tty: bool = False,
    protocols: list[str] | None = None,
) -> RemoteCommand:
    """Upgrade and open the streams in kubectl's order: error, stdin, stdout, stderr, resize."""
    client = SpdyClient(url, protocols or ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"])
    session = RemoteCommand(client=client, error=client.create_stream({"streamType": "error"}))
    if stdin:
        session.stdin = client.create_stream({"streamType": "stdin"})
    if stdout:
        session.stdout = client.create_stream({"streamType": "stdout"})
    if stderr and not tty:
        session.stderr = client.create_stream({"streamType": "stderr"})
    if tty and client.protocol not in ("channel.k8s.io", "v2.channel.k8s.io"):
        session.resize = client.create_stream({"streamType": "resize"})
    return session


def spdy_exec(url: str, stdin: bytes | None = None, tty: bool = False, **kwargs: Any) -> ExecResult:
    session = open_remote_command(url, stdin=stdin is not None, tty=tty, stderr=not tty, **kwargs)
    if stdin is not None:
        assert session.stdin is not None
        session.stdin.write(stdin)
        session.stdin.close()
    return session.finish()


# --- port-forward over SPDY ---------------------------------------------------------


class PortForwardSession:
    """kubectl port-forward's side: per connection an error then a data stream, same requestID."""

    def __init__(self, url: str) -> None:
        self.client = SpdyClient(url, ["portforward.k8s.io"])
        self._request_id = 0
        self._lock = threading.Lock()

    def open(self, port: int) -> tuple[ClientStream, ClientStream]:
        with self._lock:
            request_id = str(self._request_id)
            self._request_id += 1
        headers = {"streamType": "error", "port": str(port), "requestID": request_id}
        error = self.client.create_stream(headers)
        error.close()  # the client never writes to it
        data = self.client.create_stream({**headers, "streamType": "data"})
        return data, error

    def exchange(self, port: int, payload: bytes, timeout: float = 30.0) -> tuple[bytes, bytes]:
        """Send payload then EOF on a new connection; (what came back, the error stream's text)."""
        data, error = self.open(port)
        data.write(payload)
        data.close()
        reply = data.read_all(timeout)
        return reply, error.read_all(timeout)

    def close(self) -> None:
        self.client.close()


# --- WebSocket client ---------------------------------------------------------------


class WebSocketClient:
    """RFC 6455 client with channel.k8s.io framing (masking, fragments, ping/pong, close)."""

    def __init__(self, url: str, protocols: list[str]) -> None:
        self.sock, path = _connect(url)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            "Host: localhost",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if protocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status, headers, body = _read_response_head(self.sock)
        if status != 101:
            self.sock.close()
            raise UpgradeRefused(status, headers, body)
        expected = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        assert headers.get("sec-websocket-accept", [""])[0] == expected, "bad Sec-WebSocket-Accept"
        self.protocol = headers.get("sec-websocket-protocol", [""])[0]
        self.base64 = "base64" in self.protocol
        self.sock.settimeout(None)
        self._buffer = body
        self.close_code: int | None = None

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            head = bytes([0x80 | opcode, 0x80 | length])
        elif length < 65536:
            head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", length)
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if length < 4096 else _mask_fast(payload, mask)
        self.sock.sendall(head + mask + masked)

    def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            self._send_frame(0x1, str(channel).encode() + base64.b64encode(data))
        else:
            self._send_frame(0x2, bytes([channel]) + data)

    def send_stream_close(self, channel: int) -> None:
        """v5.channel.k8s.io: tell the server this channel (stdin) is done."""
        self._send_frame(0x2, bytes([255, channel]))

    def ping(self, payload: bytes = b"hi") -> None:
        self._send_frame(0x9, payload)

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def recv_frame(self) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next frame; None when the connection ended."""
        try:
            first, second = self._read(2)
            assert not second & 0x80, "server frames must not be masked"
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", self._read(8))
            return first & 0x0F, self._read(length)
        except (EOFError, OSError):
            return None

    def recv(self) -> tuple[int, bytes] | None:
        """(channel, data) of the next data message; None once closed."""
        while True:
            frame = self.recv_frame()
            if frame is None:
                return None
            opcode, payload = frame
            if opcode == 0x8:
                self.close_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                try:
                    self._send_frame(0x8, payload[:2])
                except OSError:
                    pass
                return None
            if opcode == 0xA:
                self.last_pong = payload
                continue
            if opcode in (0x1, 0x2):
                if self.base64:
                    return payload[0] - ord("0"), base64.b64decode(payload[1:])
                return payload[0], payload[1:]

    def collect(self) -> dict[int, bytes]:
        """Everything per channel until the server closes."""
        out: dict[int, bytes] = {}
        while (message := self.recv()) is not None:
            channel, data = message
            out[channel] = out.get(channel, b"") + data
        return out

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _mask_fast(payload: bytes, mask: bytes) -> bytes:
    repeat = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeat, "little")).to_bytes(len(payload), "little")
