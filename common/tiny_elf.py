"""Tiny static x86-64 programs of pyrio's own, run from sealed memfds.

Two helpers need a process that does next to nothing and costs next to no
memory: a shared-PID pod's PID 1 (services/netd/pod_init.py) and a
container's keeper (services/shimd/keeper.py). A C program linked
statically maps 0.7-1.3 MiB of file pages; these are a few hundred bytes of
machine code in one segment (a page of PSS). They run from a memfd, so no
file under the run dir (which may be mounted noexec) is needed and nothing of
the host's paths shows in /proc/PID/exe ("/memfd:<name> (deleted)").
"""

from __future__ import annotations

import fcntl
import os
import platform
import struct

from common.errors import FailedPrecondition

LOAD_ADDRESS = 0x400000
_HEADERS = 64 + 56  # the ELF header and one program header
PF_X, PF_W, PF_R = 1, 2, 4


def build_elf(body: bytes, writable: bool = False) -> bytes:
    """An executable whose one segment (code, then data) is `body`, entered at its first byte."""
    size = _HEADERS + len(body)
    elf_header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, LOAD_ADDRESS + _HEADERS, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    flags = PF_R | PF_X | (PF_W if writable else 0)
    program_header = struct.pack("<IIQQQQQQ", 1, flags, 0, LOAD_ADDRESS, LOAD_ADDRESS, size, size, 0x1000)
    return elf_header + program_header + body


def memfd_executable(name: str, program: bytes) -> int:
    """A sealed, close-on-exec memfd holding `program`: run it as /proc/self/fd/<fd>
    (the kernel opens it by path before it closes the close-on-exec fds)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise FailedPrecondition(f"pyrio's helper program {name} is built for x86-64 only (this node is {platform.machine()})")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, program)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd
