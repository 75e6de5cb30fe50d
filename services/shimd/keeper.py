"""A container's keeper: the tiny process that outlives its shim.

A shim can die (SIGKILL, a bug); its container must not notice, and a new
shim must be able to take over (re-adoption, see docs/ARCHITECTURE.md). Two
things die with a process: the fds it holds and its children. So before the
shim starts, the zygote's child forks the shim and becomes the keeper (the
shim's parent), execing this program from a memfd (common/tiny_elf.py) with:
  fd 3  <container dir>/reaped, opened O_APPEND: one 8-byte record per child it reaps
  fd 4  the read end of the container's stdout pipe
  fd 5  the read end of its stderr pipe
  fd 6  the write end of its stdin pipe
  fd 7, 8  a datagram socketpair: a tty container's pty master waits in
        fd 7's queue (sent on 8 by the shim's setup), where it outlives the
        shim without the keeper reading it
It is the child subreaper, so when the shim dies the container's init (the
shim's child) is reparented to it. It then waits: each child it reaps (the
shim, the init, anything orphaned to it) appends (pid, wait status) as two
little-endian int32s to fd 3, and it exits when it has no child left.

Holding the pipes' other ends, it keeps a container that writes while no
shim reads from dying of SIGPIPE (it blocks once the 64 KiB pipe is full and
loses nothing), and stdin from reaching EOF; a new shim takes the fds with
pidfd_getfd(2), and the pty master out of the queue.

The program (x86-64, no libc; 103 bytes):
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    for (;;) {
        pid = wait4(-1, &status, 0, NULL);
        if (pid == -ECHILD) exit(0);
        if (pid < 0) continue;
        write(3, {pid, status}, 8);
    }
"""

from __future__ import annotations

from common.tiny_elf import build_elf, memfd_executable

# Assembled from the program above with GNU as (intel syntax); the last 8
# bytes are {pid, status}, written by the program itself.
_CODE = bytes.fromhex(
    "b89d000000bf24000000be0100000031d24531d24531c00f05"  # prctl(36, 1, 0, 0, 0)
    "b83d000000bfffffffff488d353d00000031d24531d20f05"  # reap: wait4(-1, &status, 0, NULL)
    "83f8f6742485c078df"  # == -ECHILD: done; < 0: reap
    "890523000000"  # child = pid
    "b801000000bf03000000488d3512000000ba080000000f05"  # write(3, &child, 8)
    "ebbf"  # jmp reap
    "b83c00000031ff0f05"  # done: exit(0)
    "0000000000000000"  # child, status
)


def program() -> bytes:
    return build_elf(_CODE, writable=True)


def executable_fd() -> int:
    """A memfd of the program, for the zygote to exec (close-on-exec: pass it explicitly)."""
    return memfd_executable("pyrio-keeper", program())
