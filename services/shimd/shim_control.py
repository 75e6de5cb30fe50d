"""The shim's control requests: one JSON line per connection on its control
socket (state, stop, kill, exec, reopen_log, resize), one JSON line back.
"""

from __future__ import annotations

import _signal
import _socket
import _struct
import fcntl
import termios
import time

from services.shimd import compact_json
from services.shimd.shim_io import accept
from services.shimd.shim_exit import KILL_GRACE_SECONDS
from services.shimd.shim_log import READ_CHUNK

# typing is a large module the zygote (and so every shim) would carry for
# annotations alone: they are strings here, so it is only for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# A control request is one JSON line: shimd's exec requests are bounded
# (common/exec_limits.py: 1 MiB of argv, which JSON escaping can make up to
# six times longer); anything longer is refused unread.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
CONTROL_READ_SECONDS = 2.0


class ShimControl:
    """Control requests, part of the Shim (shim.py)."""

    # --- requests ------------------------------------------------------------

    def reply(self, conn: _socket.socket, message: dict[str, Any]) -> None:
        try:
            conn.sendall(compact_json.dumps(message) + b"\n")
        except OSError:
            pass
        conn.close()

    def accept_control(self) -> None:
        conn = accept(self.control)
        conn.settimeout(CONTROL_READ_SECONDS)
        try:
            request = self.read_request(conn)
        except Exception as exc:  # whatever a client sent, the shim goes on
            self.reply(conn, {"ok": False, "error": f"bad request: {type(exc).__name__}: {exc}"})
            return
        op = request.get("op")
        try:
            if op == "state":
                self.reply(conn, {"ok": True, "pid": self.pid, "running": not self.exited, "exit": self.exit_record})
            elif op == "stop":
                self.handle_stop(conn, request)
            elif op == "kill":
                self.signal_container(int(request.get("signal", _signal.SIGKILL)))
                self.reply(conn, {"ok": True})
            elif op == "reopen_log":
                self.log.path = self.spec.get("log_path", "")
                self.log.reopen()
                self.reply(conn, {"ok": True})
            elif op == "resize":
                self.resize(int(request["width"]), int(request["height"]))
                self.reply(conn, {"ok": True})
            elif op == "exec":
                self.spawn_exec(conn, request)
            else:
                self.reply(conn, {"ok": False, "error": f"unknown request {op!r}"})
        except Exception as exc:  # an odd request must not end the supervision
            self.reply(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def read_request(self, conn: _socket.socket) -> dict[str, Any]:
        """One JSON line of at most MAX_REQUEST_BYTES; ValueError otherwise."""
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n"):
                break
            if size > MAX_REQUEST_BYTES:
                raise ValueError(f"request is over {MAX_REQUEST_BYTES} bytes")
        raw = b"".join(chunks)
        chunks.clear()
        if size > READ_CHUNK:
            self.output_since_trim = True  # a big request's pages go back once quiet
        request = compact_json.loads(raw)
        if not isinstance(request, dict):
            raise ValueError("request is not a JSON object")
        return request

    def handle_stop(self, conn: _socket.socket, request: dict[str, Any]) -> None:
        if self.exited:
            self.reply(conn, {"ok": True, "exit": self.exit_record})
            return
        timeout = float(request.get("timeout", 0))
        if timeout <= 0:
            self.signal_container(_signal.SIGKILL)
            self.stop_waiters.append([conn, time.monotonic() + KILL_GRACE_SECONDS, True])
        else:
            self.signal_container(int(request.get("signal", _signal.SIGTERM)))
            self.stop_waiters.append([conn, time.monotonic() + timeout, False])

    def resize(self, width: int, height: int) -> None:
        if not self.tty or not self.outputs:
            raise ValueError("the container has no terminal")
        master = next(iter(self.outputs))
        fcntl.ioctl(master, termios.TIOCSWINSZ, _struct.pack("HHHH", height, width, 0, 0))
