"""Accepting streaming connections and reading their request heads, in one thread.

A connection costs a thread only once its whole request head has arrived:
until then it is an fd and a buffer in one selector loop, so slow or silent
clients (slowloris: 1,500 connections at 1 byte/s, issue 15 item 8) cannot
grow crigw's threads or memory. Each head must arrive within
`streaming.request_head_timeout` seconds, TLS handshake included, or the
connection is closed; at most `streaming.max_pending_connections` wait at
once, and a new connection past that closes the one that has waited longest,
so a client that sends its head at once (every real one) always gets
through, however many slow ones hold connections open.
"""

from __future__ import annotations

import errno
import io
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from typing import Callable

from services.crigw.streaming.http_messages import MAX_HEADER_BYTES, http_response

log = logging.getLogger("pyrio.crigw.streaming")

# (socket, request head bytes, bytes the client sent after the head)
HeadHandler = Callable[[socket.socket, bytes, bytes], None]
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
_RECV_BYTES = 16 * 1024


class _Pending:
    __slots__ = ("sock", "deadline", "buffer", "handshaking")

    def __init__(self, sock: socket.socket, deadline: float, handshaking: bool) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = bytearray()
        self.handshaking = handshaking


class RequestHeadReader:
    def __init__(
        self,
        listener: socket.socket,
        tls: ssl.SSLContext | None,
        head_timeout: float,
        max_pending: int,
        on_head: HeadHandler,
    ) -> None:
        self._listener = listener
        self._tls = tls
        self._head_timeout = head_timeout
        self._max_pending = max(1, max_pending)
        self._on_head = on_head
        self._selector = selectors.DefaultSelector()
        # fd -> pending connection, oldest first.
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._stopping = threading.Event()
        self.closed_unfinished = 0  # connections dropped before their head: expired or evicted

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                wait = 1.0
                if self._pending:
                    wait = max(0.0, min(wait, next(iter(self._pending.values())).deadline - time.monotonic()))
                for key, _ in self._selector.select(wait):
                    if key.fileobj is self._listener:
                        self._accept_all()
                    else:
                        self._advance(key.fd)
                self._expire()
        finally:
            for fd in list(self._pending):
                self._drop(fd)
            self._selector.close()

    # --- accepting ---------------------------------------------------------

    def _accept_all(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and self._pending:
                    self._evict_oldest()
                    continue
                if self._stopping.is_set() or exc.errno == errno.EBADF:
                    return
                log.warning("cannot accept a streaming connection: %s", exc)
                time.sleep(0.05)
                return
            if len(self._pending) >= self._max_pending:
                self._evict_oldest()
            self._add(sock)

    def _add(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        handshaking = False
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ssl.SSLError):
                sock.close()
                return
            handshaking = True
        pending = _Pending(sock, time.monotonic() + self._head_timeout, handshaking)
        self._pending[sock.fileno()] = pending
        self._selector.register(sock, selectors.EVENT_READ)
        self._advance(sock.fileno())

    def _evict_oldest(self) -> None:
        fd = next(iter(self._pending))
        log.debug("closing the longest-waiting streaming connection: too many without a request head")
        self._drop(fd)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            fd, pending = next(iter(self._pending.items()))
            if pending.deadline > now:
                return
            log.debug("closing a streaming connection that sent no request head in time")
            _send_quietly(pending.sock, http_response(408, "Request Timeout", body="request head not received in time\n"))
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        pending = self._pending.pop(fd)
        self.closed_unfinished += 1
        self._forget(pending.sock)
        pending.sock.close()

    def _forget(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # --- reading -------------------------------------------------------------

    def _advance(self, fd: int) -> None:
        pending = self._pending.get(fd)
        if pending is None:
            return
        try:
            if pending.handshaking:
                assert isinstance(pending.sock, ssl.SSLSocket)
                pending.sock.do_handshake()
                pending.handshaking = False
            while True:
                data = pending.sock.recv(_RECV_BYTES)
                if not data:
                    self._drop(fd)
                    return
                pending.buffer += data
                if self._head_complete(fd, pending):
                    return
                if not (isinstance(pending.sock, ssl.SSLSocket) and pending.sock.pending()):
                    return
        except ssl.SSLWantWriteError:
            self._selector.modify(pending.sock, selectors.EVENT_WRITE)
        except (ssl.SSLWantReadError, BlockingIOError):
            self._selector.modify(pending.sock, selectors.EVENT_READ)
        except (OSError, ssl.SSLError):
            self._drop(fd)

    def _head_complete(self, fd: int, pending: _Pending) -> bool:
        ends = [(index, len(end)) for end in _HEAD_ENDS if (index := pending.buffer.find(end)) >= 0]
        if not ends:
            if len(pending.buffer) > MAX_HEADER_BYTES:
                _send_quietly(pending.sock, http_response(431, "Request Header Fields Too Large", body="request head too large\n"))
                self._drop(fd)
                return True
            return False
        index, length = min(ends)
        head, rest = bytes(pending.buffer[: index + length]), bytes(pending.buffer[index + length :])
        del self._pending[fd]
        self._forget(pending.sock)
        pending.sock.setblocking(True)
        try:
            self._on_head(pending.sock, head, rest)
        except Exception:
            log.exception("cannot hand a streaming connection over")
            pending.sock.close()
        return True


class PrefixedSocketReader(io.RawIOBase):
    """Reads first the bytes that came after the request head, then the socket."""

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self._sock = sock
        self._prefix = memoryview(prefix)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            count = min(len(buffer), len(self._prefix))
            buffer[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            return count
        return self._sock.recv_into(buffer)


def session_reader(sock: socket.socket, rest: bytes) -> io.BufferedReader:
    return io.BufferedReader(PrefixedSocketReader(sock, rest))


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except (OSError, ssl.SSLError):
        pass
