"""Connect to a port on a pod's localhost from inside the pod's network namespace.

setns(CLONE_NEWNET) changes only the calling thread's namespace, so each
dial runs on a thread of its own that enters the namespace, connects, and
ends; the socket keeps the namespace it was made in.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT_SECONDS = 10.0

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def dial_in_netns(netns_path: str | None, port: int, timeout: float = CONNECT_TIMEOUT_SECONDS) -> socket.socket:
    """A TCP connection to localhost:port (IPv4, then IPv6) inside the namespace at netns_path
    (None: the node's own network namespace, for host-network pods)."""
    result: dict[str, object] = {}

    def connect() -> None:
        try:
            if netns_path is not None:
                _setns(netns_path)
            errors = []
            for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect((address, port))
                except OSError as exc:
                    sock.close()
                    errors.append(f"dial tcp {address}:{port}: {exc.strerror or exc}")
                    continue
                sock.settimeout(None)
                result["socket"] = sock
                return
            result["error"] = OSError(
                f"failed to connect to localhost:{port} inside namespace {netns_path or 'of the node'!r}: " + "; ".join(errors)
            )
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=connect, name=f"netns-dial-{port}", daemon=True)
    thread.start()
    thread.join()
    if "socket" in result:
        return result["socket"]  # type: ignore[return-value]
    raise result.get("error") or OSError(f"could not connect to port {port}")  # type: ignore[misc]
