"""The shim's exec: `<runtime> exec` run from the shim's own poll loop, with a timeout and bounded output.

The runtime is spawned straight from the shim (posix_spawn, a vfork: no copy
of the shim), and its stdout and stderr pipes, its deadline and its exit
status are handled by the poll loop like the container's own output, so a
slow command never stalls the loop. An earlier design forked a child of the
shim to run each exec: the fork, the child's first page copies and its exit
cost more than the rest of the shim's part of an ExecSync on a loaded node.
"""

from __future__ import annotations

import _signal
import _socket
import binascii
import math
import os
import select
import time

from services.shimd import compact_json
from services.shimd.shim_io import set_nonblocking, spawn
from services.shimd.shim_log import READ_CHUNK

# typing is a large module the zygote (and so every shim) would carry for
# annotations alone: they are strings here, so it is only for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# ExecSync output kept per stream; the rest is read and discarded so the
# exec'd command never blocks, and the caller learns it was truncated.
DEFAULT_EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024
# Once the container exited and its output is drained, an exec still
# running (a process of a shared PID namespace holding its pipes) is killed
# and given this long to end before it is answered as not running.
EXEC_AFTER_EXIT_SECONDS = 2.0
# The longest the loop waits on shimd taking an exec's answer (up to twice
# the output limit, base64-encoded) before it drops the connection.
EXEC_REPLY_SECONDS = 5.0


class ExecJob:
    """One `<runtime> exec` in flight: its pipes, output, deadline and status."""

    def __init__(self, conn: _socket.socket, pid: int, fds: tuple[int, int], pid_file: str,
                 limit: int, deadline: float) -> None:
        self.conn = conn
        self.pid = pid
        self.out_fd, self.err_fd = fds
        self.open_fds = set(fds)
        self.output = {self.out_fd: bytearray(), self.err_fd: bytearray()}
        self.pid_file = pid_file
        self.limit = limit
        self.deadline = deadline  # monotonic; 0: none
        self.status: int | None = None  # the runtime's wait status once reaped
        self.timed_out = False
        self.truncated = False

    def read(self, fd: int) -> None:
        """One chunk of fd's output, kept up to the limit; closes fd at its end."""
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.open_fds.discard(fd)
            os.close(fd)
            return
        kept = self.output[fd]
        room = self.limit - len(kept)
        if room < len(data):
            self.truncated = True
        if room > 0:
            kept += data[:room]

    def close_fds(self) -> None:
        for fd in self.open_fds:
            os.close(fd)
        self.open_fds.clear()

    def kill(self) -> None:
        kill_exec(self.pid_file, self.pid)

    def result(self) -> dict[str, Any]:
        returncode = os.waitstatus_to_exitcode(self.status if self.status is not None else 255 << 8)
        return {
            "ok": True,
            "stdout": binascii.b2a_base64(self.output[self.out_fd], newline=False).decode(),
            "stderr": binascii.b2a_base64(self.output[self.err_fd], newline=False).decode(),
            "exit_code": returncode if returncode >= 0 else 128 - returncode,
            "timed_out": self.timed_out,
            "truncated": self.truncated,
        }


class ShimExec:
    """Exec requests, part of the Shim (shim.py)."""

    exec_jobs: dict[int, ExecJob]  # the runtime's pid -> its job
    exec_fds: dict[int, ExecJob]  # each open output pipe -> its job
    _exec_runtime: tuple[list[str], str] | None

    def spawn_exec(self, conn: _socket.socket, request: dict[str, Any]) -> None:
        if self.exited:
            self.reply(conn, {"ok": False, "error": "container is not running", "not_running": True})
            return
        command = [str(part) for part in request.get("cmd") or []]
        timeout = float(request.get("timeout") or 0)
        if not math.isfinite(timeout) or timeout < 0:
            raise ValueError(f"exec timeout must be a finite number of seconds, got {timeout}")
        limit = int(request.get("max_output") or DEFAULT_EXEC_OUTPUT_LIMIT)
        pid_file = str(request["pid_file"])
        runtime, container_id = self.exec_runtime()
        args = runtime + ["exec", "--pid-file", pid_file, container_id, *command]
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = spawn(args, (devnull, out_w, err_w))
        except OSError:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, devnull):
                os.close(fd)
        for fd in (out_r, err_r):
            set_nonblocking(fd)
        conn.settimeout(EXEC_REPLY_SECONDS)
        job = ExecJob(conn, pid, (out_r, err_r), pid_file, limit, time.monotonic() + timeout if timeout > 0 else 0.0)
        self.exec_jobs[pid] = job
        self.exec_fds[out_r] = self.exec_fds[err_r] = job

    def exec_runtime(self) -> tuple[list[str], str]:
        """(`<runtime> --root <root>`, the container's id), taken from the spec
        once, without keeping the whole spec decoded."""
        if self._exec_runtime is None:
            spec = self._spec if self._spec is not None else compact_json.loads(self.spec_bytes)
            self._exec_runtime = ([spec["runtime_path"], "--root", spec["runtime_root"]], spec["container_id"])
        return list(self._exec_runtime[0]), self._exec_runtime[1]

    def read_exec_output(self, fd: int) -> None:
        job = self.exec_fds[fd]
        job.read(fd)
        if fd not in job.open_fds:
            del self.exec_fds[fd]
            self.finish_exec(job)

    def exec_exited(self, pid: int, status: int) -> bool:
        """Record a reaped runtime's status; False when pid ran no exec."""
        job = self.exec_jobs.get(pid)
        if job is None:
            return False
        job.status = status
        self.finish_exec(job)
        return True

    def finish_exec(self, job: ExecJob) -> None:
        """Answer once the runtime exited and both pipes reached their end."""
        if job.open_fds or job.status is None:
            return
        del self.exec_jobs[job.pid]
        try:
            os.unlink(job.pid_file)
        except OSError:
            pass
        self.output_since_trim = True  # the output's pages go back once quiet
        self.reply(job.conn, job.result())

    def exec_deadlines(self) -> list[float]:
        return [job.deadline for job in self.exec_jobs.values() if job.deadline]

    def check_exec_deadlines(self) -> None:
        now = time.monotonic()
        for job in list(self.exec_jobs.values()):
            if job.deadline and now >= job.deadline:
                job.timed_out = True
                job.deadline = 0.0  # keep reading until the pipes close
                job.kill()

    def end_execs(self) -> None:
        """The container is gone: kill what still runs, give it a moment, and
        answer every exec left as not running."""
        for job in self.exec_jobs.values():
            job.kill()
        until = time.monotonic() + EXEC_AFTER_EXIT_SECONDS
        while self.exec_jobs and time.monotonic() < until:
            fds = list(self.exec_fds)
            if fds:
                ready, _, _ = select.select(fds, [], [], 0.05)
                for fd in ready:
                    self.read_exec_output(fd)
            else:
                time.sleep(0.05)
            self.reap()
        for job in list(self.exec_jobs.values()):
            job.close_fds()
            self.reply(job.conn, {"ok": False, "error": "the container exited during the exec", "not_running": True})
        self.exec_jobs.clear()
        self.exec_fds.clear()


def kill_exec(pid_file: str, runtime_pid: int) -> None:
    # runc exec does not pass SIGKILL on: kill the exec'd process itself.
    try:
        with open(pid_file) as handle:
            os.kill(int(handle.read().strip()), _signal.SIGKILL)
    except (OSError, ValueError):
        # Not started yet (or gone): end the runtime's exec instead.
        try:
            os.kill(runtime_pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass
