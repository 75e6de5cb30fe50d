"""Starting a shim through the zygote, and talking to a running one."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.errors import DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, Unavailable
from services.shimd import keeper
from services.shimd.zygote import MAX_SPEC_BYTES, SPEC_ADOPT, SPEC_CREATE

# How runc reports that the container's own process could not be
# executed, as opposed to a failure of the runtime itself.
EXEC_FAILURE = "unable to start container process: exec:"

# How long a spawned shim may take to pick its spec up from the zygote's
# socket (see services/shimd/zygote.py); after that it drops it.
SHIM_PICKUP_SECONDS = 10.0
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
# -I -S: no site packages, no environment-driven paths; the zygote needs
# nothing but the standard library and services/shimd.
ZYGOTE_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from services.shimd import zygote; zygote.main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))"
)


class ZygoteProcess:
    """shimd's handle on the shim zygote (services/shimd/zygote.py)."""

    def __init__(self, label: str) -> None:
        # Non-inheritable, as Python makes every fd: only the zygote, which
        # is handed its ends explicitly, and its shims ever hold them.
        self.spec_sock, zygote_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        token_read, self.token_fd = os.pipe()
        keeper_fd = keeper.executable_fd()
        try:
            # The label (shimd's state dir) only names the zygote in `ps`.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", ZYGOTE_BOOTSTRAP, str(REPOSITORY_ROOT),
                 str(token_read), str(zygote_sock.fileno()), str(keeper_fd), f"pyrio-shim-zygote:{label}"],
                pass_fds=(token_read, zygote_sock.fileno(), keeper_fd),
                stdin=subprocess.DEVNULL,
                # Every symbol bound at load, in the zygote: a shim's first call of a
                # lazily bound function would write libpython's GOT, a private copy
                # of those pages per shim (about 12 KiB of each shim's private pages).
                env={**os.environ, "LD_BIND_NOW": "1"},
                # Its own session, like the shims it forks: a ^C or a
                # process-group signal meant for shimd does not end it.
                start_new_session=True,
            )
        finally:
            os.close(token_read)
            os.close(keeper_fd)
            zygote_sock.close()
        self.pid = self.process.pid
        self.lock = threading.Lock()

    def spawn(self, spec: dict[str, Any], notify_fd: int, pickup_seconds: float, kind: bytes = SPEC_CREATE) -> None:
        """Have a shim forked for spec; it reports on notify_fd.

        A shim that has not picked the spec up within pickup_seconds drops
        it, so the caller can give up after that without a late start.
        """
        deadline_ns = time.monotonic_ns() + int(pickup_seconds * 1e9)
        message = deadline_ns.to_bytes(8, "little") + kind + json.dumps(spec).encode()
        if len(message) > MAX_SPEC_BYTES:
            raise InvalidArgument(f"the container's shim spec is {len(message)} bytes, over the {MAX_SPEC_BYTES} a shim accepts (very long paths?)")
        with self.lock:
            try:
                socket.send_fds(self.spec_sock, [message], [notify_fd])
                os.write(self.token_fd, b"s")
            except OSError as exc:
                raise Unavailable(f"the shim zygote is not accepting spawns ({exc})") from None

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """Closing the token pipe ends the zygote (its shims live on)."""
        os.close(self.token_fd)
        self.spec_sock.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_zygote: ZygoteProcess | None = None
_zygote_lock = threading.Lock()
_zygote_label = ""


def start_zygote(label: str) -> ZygoteProcess:
    """Start (or restart) the zygote now, so the first spawn does not wait for its warm-up."""
    global _zygote_label
    with _zygote_lock:
        _zygote_label = label
        return _replace_zygote()


def zygote() -> ZygoteProcess:
    """The running zygote, restarted when it died."""
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            return _replace_zygote()
        return _zygote


def _replace_zygote() -> ZygoteProcess:
    """End the current zygote, if any, and start a new one (under _zygote_lock)."""
    global _zygote
    if _zygote is not None:
        _zygote.close()
    _zygote = ZygoteProcess(_zygote_label)
    return _zygote


def spawn_shim(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Start a shim and wait until its `runtime create` finished (or, for a
    spec with "adopt", until it took over the running container).

    Returns {"shim_pid", "keeper_pid", "pid"}; raises Internal with the
    runtime's own message when the create failed.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        pickup_seconds = min(SHIM_PICKUP_SECONDS, timeout)
        try:
            zygote().spawn(spec, write_fd, pickup_seconds, SPEC_ADOPT if spec.get("adopt") else SPEC_CREATE)
        finally:
            os.close(write_fd)
        started = time.monotonic()
        deadline = started + timeout
        buffer = b""
        answer: dict[str, Any] = {}
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise DeadlineExceeded(f"the shim did not report within {timeout:.0f}s")
            if "shim_pid" not in answer and now > started + pickup_seconds + 1.0:
                # Past its pickup deadline the spec is dropped by any shim.
                raise Unavailable(f"no shim was forked for the container within {pickup_seconds:.0f}s")
            ready, _, _ = select.select([read_fd], [], [], min(deadline - now, 0.5))
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
                        error = str(message.get("error"))
                        if EXEC_FAILURE in error:
                            # The runtime is fine; the image cannot run the
                            # command it was asked to (missing, not executable).
                            raise FailedPrecondition(f"the container's command cannot be run: {error}")
                        raise Internal(f"creating the container failed: {error}")
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
        try:
            # UTF-8, not \u escapes: what the shim reads stays near the argv's own size.
            sock.sendall(json.dumps(request, ensure_ascii=False).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the shim refused the request unread: its answer says why
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
    except (ConnectionResetError, BrokenPipeError):
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
