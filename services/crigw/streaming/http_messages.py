"""The one HTTP request a streaming connection starts with, and the answers to it.

Every streaming connection is a single request that is either refused with a
plain-text answer or upgraded (101) to SPDY or WebSocket; so this is a small
HTTP/1.1 reader and writer, not a general server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

MAX_HEADER_BYTES = 64 * 1024


@dataclass
class HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def header_values(self, name: str) -> list[str]:
        return [part.strip() for value in self.headers.get(name.lower(), []) for part in value.split(",") if part.strip()]

    def is_upgrade(self, protocol: str) -> bool:
        connection = ",".join(self.headers.get("connection", [])).lower()
        return "upgrade" in connection and self.header("upgrade").lower() == protocol


def read_http_request(reader: BinaryIO) -> HttpRequest | None:
    request_line = reader.readline(MAX_HEADER_BYTES)
    if not request_line:
        return None
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("malformed request line")
    headers: dict[str, list[str]] = {}
    total = len(request_line)
    while True:
        line = reader.readline(MAX_HEADER_BYTES)
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise ValueError("request headers too large")
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    target = urlsplit(parts[1])
    return HttpRequest(method=parts[0], path=target.path, query=parse_qs(target.query), headers=headers)


def http_response(status: int, reason: str, headers: list[tuple[str, str]] | None = None, body: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    all_headers = list(headers or [])
    if status != 101:
        all_headers += [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Length", str(len(body.encode()))),
            ("Connection", "close"),
        ]
    lines += [f"{name}: {value}" for name, value in all_headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()
