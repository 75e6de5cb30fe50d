"""The HTTP(S) listener of crigw's /metrics.

Connections are accepted, TLS-handshaken and their request heads read by the
streaming server's `RequestHeadReader` (one selector thread, a deadline and a
cap on waiting connections, so slow clients hold no thread); each complete
request is then answered in a thread of its own, since a scrape asks every
daemon for its figures (up to a second when one is down). One request per
connection: GET /metrics; any other path is 404, another method 405.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Callable

from services.crigw.prometheus_text import CONTENT_TYPE
from services.crigw.streaming.request_heads import RequestHeadReader

log = logging.getLogger("pyrio.crigw.metrics")

PATH = "/metrics"
REQUEST_HEAD_TIMEOUT_SECONDS = 10.0
MAX_PENDING_CONNECTIONS = 64
# Prometheus scrapes one target serially; more than this at once is not a scraper.
MAX_CONCURRENT_SCRAPES = 4
SEND_TIMEOUT_SECONDS = 30.0


class MetricsServer:
    """Serves `render()`'s bytes at GET /metrics on address:port (port 0: any free one)."""

    def __init__(self, address: str, port: int, render: Callable[[], bytes],
                 certfile: str | None = None, keyfile: str | None = None) -> None:
        self._render = render
        self._scrapes = threading.BoundedSemaphore(MAX_CONCURRENT_SCRAPES)
        tls: ssl.SSLContext | None = None
        if certfile:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            tls.load_cert_chain(certfile, keyfile or None)
        listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.server_port: int = listener.getsockname()[1]
        self._reader = RequestHeadReader(listener, tls, REQUEST_HEAD_TIMEOUT_SECONDS, MAX_PENDING_CONNECTIONS,
                                         self._on_head)
        self._thread = threading.Thread(target=self._reader.run, name="metrics-http", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._reader.stop()
        self._thread.join(timeout=5)
        self._listener.close()

    def _on_head(self, sock: socket.socket, head: bytes, _rest: bytes) -> None:
        threading.Thread(target=self._answer, args=(sock, head), name="metrics-scrape", daemon=True).start()

    def _answer(self, sock: socket.socket, head: bytes) -> None:
        try:
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            sock.sendall(self._response(head))
        except (OSError, ssl.SSLError):
            pass  # the client went away
        finally:
            sock.close()

    def _response(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _plain(400, "Bad Request", "malformed request line\n")
        method, path = parts[0], parts[1].split("?", 1)[0]
        if path != PATH:
            return _plain(404, "Not Found", f"only {PATH} is served here\n")
        if method != "GET":
            return _plain(405, "Method Not Allowed", "GET only\n", [("Allow", "GET")])
        if not self._scrapes.acquire(blocking=False):
            return _plain(503, "Service Unavailable", "too many scrapes at once\n")
        try:
            body = self._render()
        except Exception:
            log.exception("cannot render the metrics")
            return _plain(500, "Internal Server Error", "cannot render the metrics (see crigw's log)\n")
        finally:
            self._scrapes.release()
        return _head(200, "OK", CONTENT_TYPE, len(body)) + body


def _head(status: int, reason: str, content_type: str, length: int, extra: list[tuple[str, str]] | None = None) -> bytes:
    headers = [("Content-Type", content_type), ("Content-Length", str(length)), ("Connection", "close"), *(extra or [])]
    return (f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


def _plain(status: int, reason: str, body: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    data = body.encode()
    return _head(status, reason, "text/plain; charset=utf-8", len(data), extra) + data
