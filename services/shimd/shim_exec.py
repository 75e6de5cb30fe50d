"""The shim's exec: a forked child runs `<runtime> exec` with a timeout and bounded output and answers the request."""

from __future__ import annotations

import _signal
import _socket
import binascii
import os
import select
import time

from services.shimd.shim_io import spawn
from services.shimd.shim_log import READ_CHUNK

# typing is a large module the zygote (and so every shim) would carry for
# annotations alone: they are strings here, so it is only for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# ExecSync output kept per stream; the rest is read and discarded so the
# exec'd command never blocks, and the caller learns it was truncated.
DEFAULT_EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024


class ShimExec:
    """Exec requests, part of the Shim (shim.py)."""

    def spawn_exec(self, conn: _socket.socket, request: dict[str, Any]) -> None:
        if self.exited:
            self.reply(conn, {"ok": False, "error": "container is not running", "not_running": True})
            return
        # A child answers the exec, so a slow command never stalls the loop
        # (and its memory goes away with it).
        child = os.fork()
        if child:
            conn.close()
            return
        try:
            _signal.set_wakeup_fd(-1)
            _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
            keep = conn.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, 65536)
            conn.settimeout(None)
            try:
                spec = self.spec
                runtime = [spec["runtime_path"], "--root", spec["runtime_root"]]
                result = run_exec(runtime, spec["container_id"], request)
            except Exception as exc:
                os.write(2, f"exec failed: {type(exc).__name__}: {exc}\n".encode())
                result = {"ok": False, "error": f"exec failed: {type(exc).__name__}: {exc}"}
            self.reply(conn, result)
        finally:
            os._exit(0)


def run_exec(runtime: list[str], container_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """`<runtime> exec` with a timeout and bounded output."""
    command = [str(part) for part in request.get("cmd") or []]
    timeout = float(request.get("timeout") or 0)
    limit = int(request.get("max_output") or DEFAULT_EXEC_OUTPUT_LIMIT)
    pid_file = request["pid_file"]
    args = runtime + ["exec", "--pid-file", pid_file, container_id, *command]
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = spawn(args, (devnull, out_w, err_w))
    finally:
        for fd in (out_w, err_w, devnull):
            os.close(fd)
    streams = {out_r: bytearray(), err_r: bytearray()}
    truncated = False
    deadline = time.monotonic() + timeout if timeout > 0 else None
    timed_out = False
    open_fds = set(streams)
    while open_fds:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select(list(open_fds), [], [], wait)
        if not ready and deadline is not None and time.monotonic() >= deadline:
            timed_out = True
            kill_exec(pid_file, pid)
            deadline = None  # keep reading until the pipes close
            continue
        for fd in ready:
            data = os.read(fd, READ_CHUNK)
            if not data:
                open_fds.discard(fd)
                continue
            room = limit - len(streams[fd])
            if room < len(data):
                truncated = True
            if room > 0:
                streams[fd] += data[:room]
    _, status = os.waitpid(pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    try:
        os.unlink(pid_file)
    except FileNotFoundError:
        pass
    return {
        "ok": True,
        "stdout": binascii.b2a_base64(streams[out_r], newline=False).decode(),
        "stderr": binascii.b2a_base64(streams[err_r], newline=False).decode(),
        "exit_code": returncode if returncode >= 0 else 128 - returncode,
        "timed_out": timed_out,
        "truncated": truncated,
    }


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
