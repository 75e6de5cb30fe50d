"""Starting a shim through the zygote, and talking to a running one."""

from __future__ import annotations

import json
import os
import select
import socket
import time
from typing import Any

from common.errors import DeadlineExceeded, FailedPrecondition, Internal, Unavailable
from services.shimd import zygote


def spawn_shim(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Start a shim and wait until its `runtime create` finished.

    Returns {"shim_pid", "pid"}; raises Internal with the runtime's own
    message when the create failed.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            zygote.get().spawn(spec, write_fd)
        finally:
            os.close(write_fd)
        deadline = time.monotonic() + timeout
        buffer = b""
        answer: dict[str, Any] = {}
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"the shim did not report within {timeout:.0f}s")
            ready, _, _ = select.select([read_fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                raise Internal("the shim exited before reporting the container's creation; see its shim.log")
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                answer.update(message)
                if "ok" in message:
                    if not message["ok"]:
                        raise Internal(f"creating the container failed: {message.get('error')}")
                    return answer
    finally:
        os.close(read_fd)


def shim_request(socket_path: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to a shim; Unavailable when it is not there (exited or killed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unavailable(f"the container's shim is not running ({exc.strerror})") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except socket.timeout:
                raise DeadlineExceeded(f"the shim did not answer {request.get('op')} within {timeout:.0f}s") from None
            if not chunk:
                break
            chunks.append(chunk)
        raw = b"".join(chunks)
    except ConnectionResetError:
        raise Unavailable("the container's shim went away during the request") from None
    finally:
        sock.close()
    if not raw:
        raise Unavailable("the container's shim closed the connection without an answer")
    reply = json.loads(raw)
    if not reply.get("ok"):
        if reply.get("not_running"):
            raise FailedPrecondition(reply.get("error", "container is not running"))
        raise Internal(f"shim: {reply.get('error')}")
    return reply
