"""Small OS helpers shared by the shim (shim.py) and its setup helper
(shim_setup.py).

Everything here runs in the shim zygote's lean interpreter, so it uses the
C modules directly (`_socket`, not `socket`; `posix_spawn`, not
`subprocess`): the Python wrappers would load `enum`, `selectors` and more
into every shim's address space.
"""

from __future__ import annotations

import _socket
import ctypes
import fcntl
import os
import sys

PR_SET_CHILD_SUBREAPER = 36
# The fds of a container's keeper (services/shimd/keeper.py), the same in
# every keeper: a new shim takes them with pidfd_getfd.
KEEPER_REAPED_FD, KEEPER_STDOUT_FD, KEEPER_STDERR_FD, KEEPER_STDIN_FD = 3, 4, 5, 6
# Both ends of a datagram socketpair: a tty container's pty master waits,
# in flight, in the queue of the first (sent on the second), so the master
# outlives the shim that received it without the keeper ever touching it.
KEEPER_TTY_QUEUE_FD, KEEPER_TTY_SEND_FD = 7, 8
KEEPER_RECORD_BYTES = 8
_SYS_PIDFD_GETFD = 438  # x86-64

# Resolved once in the zygote, so a shim does not build ctypes objects.
_libc = ctypes.CDLL(None, use_errno=True)
_libc_prctl = _libc.prctl
_libc_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only


def prctl(option: int, value: int) -> None:
    if _libc_prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A copy of another process's fd (pidfd_getfd(2)), close-on-exec."""
    fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd({target_fd}): {os.strerror(err)}")
    return fd


def keeper_exit_status(path: str, pid: int) -> int | None:
    """The wait status the keeper recorded for `pid` (None when it has not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    found = None
    for at in range(0, len(data) - KEEPER_RECORD_BYTES + 1, KEEPER_RECORD_BYTES):
        if int.from_bytes(data[at : at + 4], "little", signed=True) == pid:
            found = int.from_bytes(data[at + 4 : at + 8], "little", signed=True)
    return found


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim):
    after a burst of output they would stay private to the shim."""
    if _libc_malloc_trim is not None:
        _libc_malloc_trim(0)


def atomic_write(path: str, data: bytes) -> None:
    # Not common.state's: that one brings tempfile and pathlib (and random's
    # after-fork hook) into the zygote, which every shim would pay for.
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    for attempt in range(3):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, path)
            break
        except FileNotFoundError:
            # A shimd starting at this moment sweeps temp files that look
            # left behind by a crash; this one was not, so write it again.
            if attempt == 2:
                raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def accept(listener: _socket.socket) -> _socket.socket:
    """socket.accept for a bare _socket.socket; the new fd is close-on-exec."""
    fd, _ = listener._accept()
    return _socket.socket(fileno=fd)


def send_fds(sock: _socket.socket, message: bytes, fds: list[int]) -> None:
    """One message with file descriptors attached (SCM_RIGHTS)."""
    data = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
    sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, data)])


def receive_fds(sock: _socket.socket, bufsize: int, maxfds: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One message and the file descriptors passed with it (SCM_RIGHTS),
    close-on-exec like every other fd here: no runtime or container
    started later inherits them."""
    message, ancillary, _, _ = sock.recvmsg(bufsize, _socket.CMSG_LEN(maxfds * 4), flags | _socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            for at in range(0, len(data) - len(data) % 4, 4):
                fds.append(int.from_bytes(data[at : at + 4], sys.byteorder))
    return message, fds


def set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def spawn(args: list[str], stdio: tuple[int, int, int]) -> int:
    """posix_spawn with the given stdio (every other fd here is close-on-exec)."""
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
    return os.posix_spawn(args[0], args, os.environ, file_actions=actions)
