"""The shim zygote: a small single-threaded process that forks the shims.

shimd forks it first thing, before importing ZeroMQ, msgpack or starting a
thread (services/shimd/__main__.py), so it holds nothing but the interpreter
and the shim module. Every shim is forked from it: the interpreter's pages
are shared copy-on-write by all shims (gc.freeze() keeps the collector from
dirtying them), and forking a single-threaded process cannot inherit a lock
some other thread held. Each shim is double-forked into a session of its
own, so it is a child of neither the zygote, shimd nor supervisord, and
outlives all of them.

Protocol on the socketpair, one request at a time: shimd sends the shim's
spec as JSON with the write end of a notify pipe attached (SCM_RIGHTS); the
zygote answers b"ok" once the shim is forked. The shim itself reports on the
notify pipe: {"shim_pid"}, then {"ok": true, "pid"} or {"ok": false, "error"}.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket

from services.shimd import shim

# typing is a large module the zygote (and so every shim) would carry for
# annotations alone: they are strings here, so it is only for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_zygote: "ZygoteClient | None" = None
# threading is imported only in shimd, after the zygote forked: with it
# loaded, every fork in the zygote would run threading's after-fork hook.
_lock: Any = None


def _serve(sock: socket.socket) -> None:
    shim.prctl(shim.PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    scratch = os.path.join(os.environ.get("TMPDIR", "/tmp"), f".pyrio-zygote-{os.getpid()}")
    os.mkdir(scratch, 0o700)
    try:
        shim.warm_up(scratch)
    except Exception as exc:  # only memory is at stake: keep serving
        os.write(2, f"shim zygote: warm-up failed: {exc}\n".encode())
    finally:
        for directory, subdirs, files in os.walk(scratch, topdown=False):
            for name in files:
                os.unlink(os.path.join(directory, name))
            os.rmdir(directory)
    gc.collect()
    # Hand back the heap the warm-up freed: fewer resident pages for every
    # shim to share (glibc only; elsewhere this is skipped).
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:
        pass
    gc.freeze()
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
        except OSError:
            os._exit(0)
        if not message:  # shimd is gone
            os._exit(0)
        try:
            spec = json.loads(message)
            notify_fd = fds[0]
        except (ValueError, IndexError):
            for fd in fds:
                os.close(fd)
            sock.send(b"error")
            continue
        first = os.fork()
        if first == 0:
            sock.close()
            os.setsid()
            if os.fork() == 0:
                # Never let the container's stdio be our parent's.
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                log_fd = os.open(spec["shim_log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(log_fd, 2)
                os.close(null)
                os.close(log_fd)
                shim.run(spec, notify_fd)
            os._exit(0)
        os.close(notify_fd)
        os.waitpid(first, 0)
        sock.send(b"ok")


class ZygoteClient:
    def __init__(self, pid: int, sock: socket.socket) -> None:
        import threading

        self.pid = pid
        self.sock = sock
        self.lock = threading.Lock()

    def spawn(self, spec: dict[str, Any], notify_fd: int) -> None:
        with self.lock:
            socket.send_fds(self.sock, [json.dumps(spec).encode()], [notify_fd])
            answer = self.sock.recv(16)
        if answer != b"ok":
            raise RuntimeError(f"the shim zygote could not start the shim ({answer!r})")

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0


def start() -> ZygoteClient:
    """Fork the zygote now; call before any thread exists."""
    global _zygote
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        try:
            _serve(child_sock)
        finally:
            os._exit(0)
    child_sock.close()
    parent_sock.set_inheritable(False)
    _zygote = ZygoteClient(pid, parent_sock)
    return _zygote


def get() -> ZygoteClient:
    """The zygote of this process, started (or restarted) when needed."""
    global _lock
    if _lock is None:
        import threading

        _lock = threading.Lock()
    with _lock:
        if _zygote is None or not _zygote.alive():
            start()
        assert _zygote is not None
        return _zygote
