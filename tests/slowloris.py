"""A slowloris attacker for the streaming server (issue 15 item 8), shared by
tests/test_streaming_attack.py and `python -m bench slowloris`.

It opens `count` TCP connections to 127.0.0.1 and sends each one byte of a
request head per `interval`, never finishing it, from one thread (one
selector, no thread per connection). It records when the server closes each
one; with `reconnect` a closed connection is opened again, so the attack
keeps `count` connections in flight.
"""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

HEAD = b"GET /exec/" + b"a" * 4000 + b" HTTP/1.1\r\nHost: x\r\n"


@dataclass
class _Connection:
    sock: socket.socket
    opened_at: float
    sent: int = 0


@dataclass
class Slowloris:
    host: str
    port: int
    count: int
    interval: float = 1.0
    reconnect: bool = False
    opened: int = 0
    closed_by_server: int = 0
    lifetimes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < self.count + 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, self.count + 1024), hard))
        self._selector = selectors.DefaultSelector()
        self._open: dict[int, _Connection] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def start(self) -> "Slowloris":
        for _ in range(self.count):
            self._connect()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for connection in list(self._open.values()):
            self._selector.unregister(connection.sock)
            connection.sock.close()
        self._open.clear()
        self._selector.close()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        result = sock.connect_ex((self.host, self.port))
        if result not in (0, errno.EINPROGRESS):
            sock.close()
            return
        self._open[sock.fileno()] = _Connection(sock, time.monotonic())
        self._selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _closed(self, fd: int) -> None:
        connection = self._open.pop(fd)
        self._selector.unregister(connection.sock)
        connection.sock.close()
        self.closed_by_server += 1
        self.lifetimes.append(time.monotonic() - connection.opened_at)
        if self.reconnect and not self._stop.is_set():
            self._connect()

    def _run(self) -> None:
        next_send = time.monotonic()
        while not self._stop.is_set():
            for key, _ in self._selector.select(max(0.0, min(0.2, next_send - time.monotonic()))):
                # Readable: the server answered (408, 431) or closed; either ends it.
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._closed(key.fd)
            if time.monotonic() >= next_send:
                next_send += self.interval
                for fd, connection in list(self._open.items()):
                    try:
                        connection.sock.send(HEAD[connection.sent % len(HEAD) : connection.sent % len(HEAD) + 1])
                        connection.sent += 1
                    except BlockingIOError:
                        pass  # still connecting, or the server's window is full
                    except OSError:
                        self._closed(fd)


@dataclass
class ProcessUsage:
    threads: int
    fds: int
    rss_kib: int


def process_usage(pid: int) -> ProcessUsage:
    """Threads, open fds and resident memory of a process, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return ProcessUsage(
        threads=int(fields["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        rss_kib=int(fields["VmRSS"].split()[0]),
    )
