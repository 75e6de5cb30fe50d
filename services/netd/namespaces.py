"""Pod namespaces pinned by bind mounts, the way CRI-O's pinns does.

A pod's network, IPC and UTS namespaces are created by a short-lived thread
of netd that unshares them (namespaces are per task on Linux, so the rest of
netd is untouched), sets the pod hostname, brings `lo` up, writes the pod's
sysctls, bind-mounts `/proc/thread-self/ns/<kind>` on a file under the run
dir, and ends. The bind mount keeps the namespace alive with no process in
it, and containers join it by path. The thread is dedicated and dies at the
end, so even a failed restore cannot leave a netd worker in a pod namespace.

A PID namespace needs a live init, so a pod that shares one gets a tiny
holder process as its PID 1 (pod_init.py: it only reaps orphans and ignores
the pod's signals), pinned the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from common import mounts
from common.errors import InvalidArgument
from services.netd import pod_init
from services.netd.sysctls import proc_path as sysctl_proc_path

log = logging.getLogger("pyrio.netd.namespaces")

CLONE_FLAGS = {"net": 0x40000000, "ipc": 0x08000000, "uts": 0x04000000, "pid": 0x20000000}
# Directory of each kind's pin files under the run dir, as CRI-O's
# /var/run/{netns,ipcns,utsns,pidns}.
PIN_DIRS = {"net": "netns", "ipc": "ipcns", "uts": "utsns", "pid": "pidns", "user": "userns"}
# SIGKILL of a pod's PID 1 ends every process of its namespace first.
HOLDER_EXIT_SECONDS = 10.0

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

def pin_path(run_dir: str, kind: str, sandbox_id: str) -> str:
    return str(Path(run_dir) / PIN_DIRS[kind] / sandbox_id)


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare: {os.strerror(errno)}")


def _setns(fd: int, flags: int) -> None:
    if _libc.setns(fd, flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _in_dedicated_thread(work: Callable[[], Any]) -> Any:
    """Run `work` on a new OS thread that ends afterwards; re-raise its error."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=body, name="netd-pinns")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _bring_loopback_up() -> None:
    # A socket belongs to the network namespace of the task that opens it.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def write_sysctl(name: str, value: str) -> None:
    """Write one sysctl of the calling thread's namespaces."""
    path = sysctl_proc_path(name)
    try:
        with open(path, "w") as handle:
            handle.write(value)
    except OSError as exc:
        # The kernel's verdict on the name or value (ENOENT, EINVAL).
        raise InvalidArgument(f"cannot set sysctl {name}={value!r}: {exc.strerror}") from None


def bind_pin(source: str, target: str) -> None:
    Path(target).parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o444)
    os.close(fd)
    mounts.mount(source, target, None, mounts.MS_BIND)


def configure_pod_namespaces(kinds: list[str], hostname: str, sysctls: dict[str, str]) -> None:
    """In the calling thread's new namespaces: the hostname, `lo` up, the sysctls."""
    if "uts" in kinds and hostname:
        socket.sethostname(hostname)
    if "net" in kinds:
        _bring_loopback_up()
    for name, value in sysctls.items():
        write_sysctl(name, value)


def pin_namespaces(paths: dict[str, str], hostname: str = "", sysctls: dict[str, str] | None = None) -> None:
    """Create one new namespace per kind in `paths` (net, ipc, uts) and pin it.

    The hostname is set in the new UTS namespace, `lo` brought up in the new
    network namespace and `sysctls` written inside them. On error the pins
    made so far stay mounted: the caller's `unpin` removes them.
    """
    kinds = [kind for kind in ("net", "ipc", "uts") if kind in paths]
    if not kinds:
        return
    flags = 0
    for kind in kinds:
        flags |= CLONE_FLAGS[kind]

    def work() -> None:
        saved = {kind: os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY) for kind in kinds}
        try:
            unshare(flags)
            try:
                configure_pod_namespaces(kinds, hostname if "uts" in paths else "", sysctls or {})
                for kind in kinds:
                    bind_pin(f"/proc/thread-self/ns/{kind}", paths[kind])
            finally:
                for kind, fd in saved.items():
                    _setns(fd, CLONE_FLAGS[kind])
        finally:
            for fd in saved.values():
                os.close(fd)

    _in_dedicated_thread(work)


def start_pid_holder(path: str, sandbox_id: str) -> int:
    """Start the PID 1 of a new pod PID namespace (pod_init.py) and pin that namespace at `path`; its pid."""

    def work() -> int:
        # unshare(CLONE_NEWPID) changes where this thread's children go, so
        # the holder started next is PID 1 of the new namespace.
        unshare(CLONE_FLAGS["pid"])
        return pod_init.spawn(sandbox_id)

    holder: int = _in_dedicated_thread(work)
    try:
        bind_pin(f"/proc/{holder}/ns/pid", path)
    except BaseException:
        stop_pid_holder(holder, sandbox_id)
        raise
    return holder


def is_pid_holder(pid: int, sandbox_id: str) -> bool:
    """True when `pid` is still this sandbox's holder (not a reused pid)."""
    return bool(pid) and pod_init.holds_sandbox(pid, sandbox_id)


def stop_pid_holder(pid: int, sandbox_id: str) -> None:
    """Kill the holder (and with it every process of the pod PID namespace) and wait until it is gone."""
    if not is_pid_holder(pid, sandbox_id):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + HOLDER_EXIT_SECONDS
    while time.monotonic() < deadline:
        try:
            # A holder this netd started is its child; one an earlier netd started is init's.
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return
        time.sleep(0.01)
    log.warning("the PID holder did not exit after SIGKILL", extra={"pid": pid, "sandbox_id": sandbox_id})


def reap(pid: int) -> None:
    """Collect a dead holder this netd started (one an earlier netd started is init's to reap)."""
    try:
        if pid:
            os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def unpin(path: str) -> None:
    """Unmount a namespace pin and remove its file; fine when already gone."""
    if not path:
        return
    # A pin can be mounted more than once if a crash hit between two tries.
    while mounts.umount(path, lazy=True):
        pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def is_pinned(path: str) -> bool:
    return bool(path) and mounts.is_mount_point(path)
