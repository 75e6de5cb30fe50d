"""The PID 1 of a shared pod PID namespace: a 200-byte program of our own.

What a pod's PID 1 has to do is what Kubernetes' pause does, less: reap the
processes orphaned into the namespace and never go away while the pod
lives. The kernel does the rest for an init of a PID namespace: a signal from
inside the namespace reaches it only if it has a handler for that signal,
and this program installs none, so `kill -TERM 1` or `kill -KILL 1` from any
container is a no-op. netd ends it with SIGKILL from outside the namespace.

The program (x86-64 machine code, no libc) makes three system calls:
    rt_sigaction(SIGCHLD, {SIG_IGN}, NULL, 8)   the kernel reaps every child
    chdir("/")                                  pins no directory of the host
    for (;;) pause();
(catatonit, in its pause mode, exits on SIGTERM even from inside the pod.)
It runs from a sealed memfd (common/tiny_elf.py), so nothing of the host
shows in the pod: /proc/1/cmdline is "pause", /proc/1/exe
"/memfd:pod-init (deleted)". netd finds
its holders again by their environment (POD_HOLDER_ENV = sandbox id).
"""

from __future__ import annotations

import os
import struct

from common.tiny_elf import build_elf, memfd_executable

POD_HOLDER_ENV = "PYRIO_POD_SANDBOX"
# The code, then the `struct sigaction` it passes (at CODE + 56) and "/" (at CODE + 88).
_CODE = bytes.fromhex(
    "b80d000000"  # mov eax, 13 (rt_sigaction)
    "bf11000000"  # mov edi, 17 (SIGCHLD)
    "488d3527000000"  # lea rsi, [rip + 39] -> the sigaction at 56
    "31d2"  # xor edx, edx (no old action)
    "41ba08000000"  # mov r10d, 8 (sizeof sigset_t)
    "0f05"  # syscall
    "b850000000"  # mov eax, 80 (chdir)
    "488d3d31000000"  # lea rdi, [rip + 49] -> "/" at 88
    "0f05"  # syscall
    "b822000000"  # loop: mov eax, 34 (pause)
    "0f05"  # syscall
    "ebf7"  # jmp loop
    "000000000000"  # pad to 56
)
_SIGACTION = struct.pack("<QQQQ", 1, 0, 0, 0)  # SIG_IGN, no flags, no restorer, empty mask
_ROOT = b"/\0"


def program() -> bytes:
    """The whole ELF executable."""
    return build_elf(_CODE + _SIGACTION + _ROOT)


_memfd = -1


def _executable_fd() -> int:
    """The program's memfd, made once per netd process."""
    global _memfd
    if _memfd < 0:
        _memfd = memfd_executable("pod-init", program())
    return _memfd


def spawn(sandbox_id: str) -> int:
    """Start the program (in the PID namespace the calling thread's children
    go to) in a session of its own with /dev/null as stdio; its pid."""
    fd = _executable_fd()
    devnull = [(os.POSIX_SPAWN_OPEN, target, os.devnull, os.O_RDWR, 0) for target in (0, 1, 2)]
    # The memfd is close-on-exec: the kernel opens it by path before closing it.
    return os.posix_spawn(f"/proc/self/fd/{fd}", ["pause"], {POD_HOLDER_ENV: sandbox_id},
                          file_actions=devnull, setsid=True, setsigdef=(), setsigmask=())


def _environment(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read(4096).split(b"\0")
    except OSError:  # gone, or a zombie (ESRCH)
        return []


def holds_sandbox(pid: int, sandbox_id: str) -> bool:
    """True when `pid` is this sandbox's pod init (not a reused pid)."""
    return f"{POD_HOLDER_ENV}={sandbox_id}".encode() in _environment(pid)


def holds_sandbox_of_any(pid: int) -> bool:
    """True when `pid` is the pod init of some sandbox."""
    return any(entry.startswith(f"{POD_HOLDER_ENV}=".encode()) for entry in _environment(pid))
