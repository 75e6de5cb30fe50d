"""The shim zygote: the small process every shim is forked from.

shimd starts it as a fresh interpreter with no site packages
(`python -I -S`, see shim_client.ZygoteProcess), so it holds the bare
interpreter, the shim module and the few C modules that needs: the `json`,
`socket`, `signal` and `typing` packages never load. It runs whole shim
lives once (shim_warm_up.warm_up) so bytecode specialization and the interpreter's
caches settle here, freezes the heap for the collector, then forks one shim
per request. The shims share all of that copy-on-write.

What a shim costs is the pages it writes after the fork, and the pages
the zygote writes after forking it (the shim is left holding the old copy
alone). So the zygote's loop touches almost nothing: it reads one token
byte from a pipe and forks. The child itself takes its spec (JSON, with
the notify pipe attached as SCM_RIGHTS) from the spec socket, starts a
session of its own and becomes the shim. The zygote ignores SIGCHLD, so
the kernel reaps shims that end while it lives; after it is gone they are
init's children.

The zygote ends when shimd does: the token pipe reads end-of-file.
"""

from __future__ import annotations

import _signal
import _socket
import gc
import os
import select
import time

# Every shim module is imported here, before the fork, so that all shims share it copy-on-write.
from services.shimd import compact_json, shim, shim_control, shim_exec, shim_exit, shim_log, shim_setup, shim_warm_up
from services.shimd.shim_io import receive_fds, send_fds, trim_heap

# A forked shim drops a spec it could not pick up in this long (shimd died
# between the token and the spec, or a sibling that was to take it died).
SPEC_WAIT_SECONDS = 30.0
# A spec is about a kilobyte of paths; the limit keeps the buffer (and
# the pages it touches in each shim) small.
MAX_SPEC_BYTES = 8 * 1024
SPEC_CREATE, SPEC_ADOPT = b"c", b"a"


def main(token_fd: int, spec_fd: int, keeper_fd: int) -> None:
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    spec_sock = _socket.socket(fileno=spec_fd)
    scratch = os.path.join(os.environ.get("TMPDIR", "/tmp"), f".pyrio-zygote-{os.getpid()}")
    os.mkdir(scratch, 0o700)
    try:
        shim_warm_up.warm_up(scratch)
        _warm_up_pickup(scratch)
    except Exception as exc:  # only memory is at stake: keep serving
        os.write(2, f"shim zygote: warm-up failed: {type(exc).__name__}: {exc}\n".encode())
    finally:
        for directory, _, files in os.walk(scratch, topdown=False):
            for name in files:
                os.unlink(os.path.join(directory, name))
            os.rmdir(directory)
    gc.collect()
    # Hand back the heap the warm-up freed: fewer resident pages for every
    # shim to map.
    trim_heap()
    gc.freeze()
    _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)
    _fork_loop(token_fd, spec_sock, keeper_fd)


def _fork_loop(token_fd: int, spec_sock: _socket.socket, keeper_fd: int) -> None:
    """Fork one shim per token byte, touching (almost) no memory in between.

    Reading a request and decoding its JSON here, as an earlier zygote did,
    left about 340 KiB of such pages to every shim; one byte read (a bytes
    object freed again at once) and a fork leave a page or two.
    """
    read = os.read
    fork = os.fork
    while True:
        try:
            token = read(token_fd, 1)
        except OSError:
            os._exit(0)
        if not token:  # shimd is gone
            os._exit(0)
        if fork() == 0:
            _become_shim(token_fd, spec_sock, keeper_fd)


def _become_shim(token_fd: int, spec_sock: _socket.socket, keeper_fd: int) -> None:
    """In the forked child: take one spec and run the shim. Never returns.

    A spec to create a container (kind CREATE) gets a keeper: this process
    makes the container's stdio pipes, forks the shim and becomes the
    keeper (keeper.py), so the shim is its child. A spec to re-adopt a
    running container (kind ADOPT) already has its keeper: this process
    becomes the shim itself.
    """
    try:
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        os.close(token_fd)
        # Its own session: signals to shimd's process group (a terminal's
        # ^C, supervisord's stop) never reach the shim or its container.
        os.setsid()
        kind, spec_bytes, notify_fd = _receive_spec(spec_sock)
        spec_sock.close()
        if notify_fd < 0:
            return
        if kind == SPEC_ADOPT:
            os.close(keeper_fd)
            shim.run(spec_bytes, notify_fd)
        pipes = shim_setup.stdio_pipes()
        if os.fork() == 0:
            os.close(keeper_fd)
            shim.run(spec_bytes, notify_fd, pipes=pipes)
        os.close(notify_fd)
        shim_setup.become_keeper(spec_bytes, keeper_fd, pipes)
    finally:
        os._exit(1)


def _receive_spec(spec_sock: _socket.socket) -> tuple[bytes, bytes, int]:
    """(kind, spec JSON, notify fd) of one spawn, left undecoded (the shim
    decodes it only where it must); (b"", b"", -1) when none came within
    SPEC_WAIT_SECONDS or shimd is gone.

    A message is the pickup deadline (CLOCK_MONOTONIC ns, 8 bytes little
    endian), the kind (one byte: SPEC_CREATE or SPEC_ADOPT) and the spec. Tokens and specs come in pairs, and a SEQPACKET
    message goes to exactly one reader: children woken together each get
    one spec, in any order. A spec shimd already gave up on (its deadline
    passed: the child meant for it died) is dropped and the next one taken,
    so one lost child never shifts every later spawn by one.
    """
    deadline = time.monotonic() + SPEC_WAIT_SECONDS
    # poll, not select.select: that allocates three 16 KiB fd tables.
    poller = select.poll()
    poller.register(spec_sock.fileno(), select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(int(remaining * 1000) + 1):
            return b"", b"", -1
        try:
            # MSG_DONTWAIT, not setblocking: the socket's file is shared
            # with the zygote and every sibling.
            message, fds = receive_fds(spec_sock, MAX_SPEC_BYTES, 1, _socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue  # a sibling took it
        except OSError:
            return b"", b"", -1
        if not message:  # shimd is gone
            return b"", b"", -1
        if fds and time.monotonic_ns() <= int.from_bytes(message[:8], "little"):
            return message[8:9], message[9:], fds[0]
        for fd in fds:
            os.close(fd)


def _warm_up_pickup(scratch: str) -> None:
    """Take one spec the way a shim does, so that path is warm too."""
    sender, receiver = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe()
    try:
        for _ in range(10):
            deadline = time.monotonic_ns() + 10**10
            send_fds(sender, deadline.to_bytes(8, "little") + SPEC_CREATE + compact_json.dumps({"container_id": "warm-up"}), [write_fd])
            _, _, notify_fd = _receive_spec(receiver)
            os.close(notify_fd)
    finally:
        for fd in (read_fd, write_fd):
            os.close(fd)
        sender.close()
        receiver.close()

