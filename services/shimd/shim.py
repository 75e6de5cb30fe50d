"""The per-container shim: CRI-O's conmon, in a few hundred lines of Python.

One shim supervises exactly one container. It is forked from the shim zygote
(services/shimd/zygote.py) and shares the interpreter's pages with every
other shim; what it costs is the memory it writes itself, so it does as
little as it can in its own process:
- a setup helper it forks first creates the container and hands over its
  stdio and sockets (shim_setup.py); that work's pages leave with the helper;
- it is the child subreaper, so the container's init is its child and is
  reaped here;
- it writes the CRI log format (`<RFC3339Nano> <stream> <P|F> <content>`);
- the moment the container's init exits, it writes the exit file (exit code,
  time, OOM kill) atomically: it is the truth even if every service is down;
- it answers one-line JSON requests on a unix socket (state, stop, kill,
  exec, reopen_log, resize) and serves the attach socket (SOCK_SEQPACKET,
  see docs/ARCHITECTURE.md); an exec runs in a forked child;
- it exits once the container has exited and its output is drained.
The spec (JSON) is kept as bytes and decoded only when a rare path needs it
(the exit, reopening the log, an exec's child).
"""

from __future__ import annotations

import _signal
import _socket
import _struct
import binascii
import errno
import fcntl
import os
import select
import termios
import time

from services.shimd import compact_json, shim_setup
from services.shimd.shim_io import (
    PR_SET_CHILD_SUBREAPER,
    accept,
    atomic_write,
    keeper_exit_status,
    prctl,
    receive_fds,
    set_nonblocking,
    spawn,
    trim_heap,
)

# typing is a large module the zygote (and so every shim) would carry for
# annotations alone: they are strings here, so it is only for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

# A log line longer than this is written in parts marked P (as conmon does).
MAX_LOG_LINE = 16 * 1024
# The shim's one read buffer for the container's output, and the most log
# bytes it builds up before writing them out.
READ_CHUNK = 32 * 1024
LOG_BATCH_BYTES = 64 * 1024
# A shim whose container went quiet this long after output trims its heap.
TRIM_AFTER_IDLE_MS = 1000
# ExecSync output kept per stream; the rest is read and discarded so the
# exec'd command never blocks, and the caller learns it was truncated.
DEFAULT_EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024
# How long the shim keeps draining the container's output after its init
# exited (processes of a shared PID namespace may hold the pipes open).
DRAIN_SECONDS = 2.0
# Extra time a stop waits for the exit after SIGKILL before it answers.
KILL_GRACE_SECONDS = 10.0
ATTACH_SEND_TIMEOUT = 5.0
# How long a re-adopted init's exit may wait for the keeper's record of it.
KEEPER_RECORD_WAIT_SECONDS = 5.0
# A control request is one JSON line: shimd's exec requests are bounded
# (common/exec_limits.py: 1 MiB of argv, which JSON escaping can make up to
# six times longer); anything longer is refused unread.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
CONTROL_READ_SECONDS = 2.0
# The longest single poll: deadlines further out (a week-long stop grace
# period) are re-checked each time, and poll takes an int of milliseconds.
MAX_POLL_MS = 3600 * 1000

STREAM_STDOUT = b"\x02"
STREAM_STDERR = b"\x03"


def rfc3339_nano(now_ns: int) -> bytes:
    seconds, nanos = divmod(now_ns, 1_000_000_000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%09dZ" % nanos).encode()


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGCHLD only has to wake the poll loop (through the wakeup fd)."""


def read_oom_kills(paths: list[str]) -> int:
    """The cgroup's oom_kill counter (memory.oom_control on v1, memory.events on v2)."""
    for path in paths:
        try:
            with open(path) as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


class LogWriter:
    """The CRI log file of one container, reopened on request."""

    def __init__(self, path: str, fd: int = -1) -> None:
        self.path = path
        self.fd = fd
        self.partial = {b"stdout": b"", b"stderr": b""}
        if fd < 0:
            self.reopen()

    def reopen(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def write(self, stream: bytes, data: bytes | bytearray | memoryview) -> None:
        """Log one chunk the container wrote, stamped once (as conmon does).

        Lines are cut out by offset, not by re-slicing the rest of the chunk,
        and written in batches of at most LOG_BATCH_BYTES: a chatty container
        costs its shim no lasting memory beyond a batch."""
        pending = self.partial[stream]
        buffer = pending + bytes(data) if pending else bytes(data)
        stamp = rfc3339_nano(time.time_ns())
        full, part = b"%s %s F " % (stamp, stream), b"%s %s P " % (stamp, stream)
        view = memoryview(buffer)
        out = bytearray()
        start, end = 0, len(buffer)
        while start < end:
            newline = buffer.find(b"\n", start, start + MAX_LOG_LINE + 1)
            if newline >= 0:
                out += full
                out += view[start : newline + 1]
                start = newline + 1
            elif end - start > MAX_LOG_LINE:
                # More than a full line's worth with no newline in it yet.
                out += part
                out += view[start : start + MAX_LOG_LINE]
                out += b"\n"
                start += MAX_LOG_LINE
            else:
                break
            if len(out) >= LOG_BATCH_BYTES:
                self._write_out(out)
                out.clear()
        self.partial[stream] = bytes(view[start:])
        view.release()
        self._write_out(out)

    def flush_partial(self, stream: bytes) -> None:
        """At EOF a line without its newline is written as a part (P)."""
        if self.partial[stream]:
            stamp = rfc3339_nano(time.time_ns())
            self._write_out(b"%s %s P %s\n" % (stamp, stream, self.partial[stream]))
            self.partial[stream] = b""

    def _write_out(self, data: bytes | bytearray) -> None:
        if self.fd < 0 or not data:
            return
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break  # a full disk must not kill the container's supervisor
            view = view[written:]
        view.release()


class Shim:
    """The shim's serving half: the poll loop over what the setup helper handed over."""

    def __init__(self, spec_bytes: bytes, handoff: bytes, fds: list[int]) -> None:
        fields = handoff.split()
        self.spec_bytes = spec_bytes
        self._spec: dict[str, Any] | None = None
        self.pid = int(fields[0])
        stdin_enabled, self.stdin_once = fields[1] == b"1", fields[2] == b"1"
        handed = dict(zip(fields[3:], fds))
        self.stdio_fds: tuple[int, ...] = (handed[b"null"], handed[b"shim_log"])
        self.control = _socket.socket(fileno=handed[b"control"])
        self.attach = _socket.socket(fileno=handed[b"attach"])
        self.log = LogWriter("", handed.get(b"log", -1))
        self.tty = b"tty" in handed
        # A shim that re-adopted a running container (its first shim died) is
        # not the init's parent: a pidfd says when it exits, and the keeper
        # (keeper.py), which reaped it, what its status was.
        self.init_pidfd = handed.get(b"init", -1)
        self.exit_seen_at = 0.0
        # fd -> stream name for the container's output (pipes or pty master).
        self.outputs: dict[int, bytes] = {}
        self.stdin_fd = -1
        if self.tty:
            self.outputs[handed[b"tty"]] = b"stdout"
            if stdin_enabled:
                self.stdin_fd = handed[b"tty"]
        else:
            self.outputs[handed[b"stdout"]] = b"stdout"
            self.outputs[handed[b"stderr"]] = b"stderr"
            self.stdin_fd = handed.get(b"stdin", -1)
        # The container cgroup's memory.events (cgroup v2), polled for POLLPRI: the
        # kernel notifies each change; oom_kill counts read so far.
        self.oom_fd = handed.get(b"oom", -1)
        self.oom_kills = 0
        self.exited = False
        self.exit_record: dict[str, Any] | None = None
        self.stdin_pending = b""
        self.attach_clients: dict[int, _socket.socket] = {}
        # Clients that shut down their sending side: they still get output.
        self.attach_input_done: set[int] = set()
        self.stop_waiters: list[list[Any]] = []  # [conn, deadline, killed]
        self.wakeup_r = -1
        self.wakeup_w = -1
        self.read_buffer: bytearray | None = None
        # Output was handled since the heap was last trimmed (see serve).
        self.output_since_trim = False

    def adopt_stdio(self) -> None:
        """The shim's own stdio from now on: nothing of shimd's or the zygote's."""
        null, shim_log = self.stdio_fds
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(shim_log, 2)
        self.close_stdio_fds()

    def close_stdio_fds(self) -> None:
        for fd in self.stdio_fds:
            os.close(fd)
        self.stdio_fds = ()

    @property
    def spec(self) -> dict[str, Any]:
        """The spec, decoded on first use: an idle shim never needs it."""
        if self._spec is None:
            self._spec = compact_json.loads(self.spec_bytes)
        return self._spec

    # --- the loop ----------------------------------------------------------

    def serve(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        _signal.set_wakeup_fd(self.wakeup_w)
        # _signal, not signal.signal: that wrapper converts through enum
        # machinery, one more code path each shim would copy pages of.
        _signal.signal(_signal.SIGCHLD, _ignore_signal)
        for fd in self.outputs:
            set_nonblocking(fd)
        if self.stdin_fd >= 0:
            set_nonblocking(self.stdin_fd)
        self.reap()  # the init may already be gone
        drain_until = 0.0
        poller = select.poll()
        while True:
            if self.exited:
                if not drain_until:
                    drain_until = time.monotonic() + DRAIN_SECONDS
                if not self.outputs or time.monotonic() > drain_until:
                    break
            registered = self.register(poller)
            timeout = self.poll_timeout(drain_until)
            if self.output_since_trim and not 0 <= timeout <= TRIM_AFTER_IDLE_MS:
                timeout = TRIM_AFTER_IDLE_MS
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                events = []
            if not events and self.output_since_trim:
                trim_heap()
                self.output_since_trim = False
            for fd, _ in registered:
                poller.unregister(fd)
            for fd, event in events:
                try:
                    self.dispatch(fd, event)
                except Exception as exc:  # the container's only supervisor must not end over one event
                    os.write(2, f"shim: handling fd {fd}: {type(exc).__name__}: {exc}\n".encode())
            self.check_stop_deadlines()
            if self.exit_seen_at and not self.exited:
                self.check_adopted_exit()
        for fd in list(self.outputs):
            self.close_output(fd)
        self.finish()

    def register(self, poller: select.poll) -> list[tuple[int, int]]:
        entries: list[tuple[int, int]] = [(self.wakeup_r, select.POLLIN)]
        entries.append((self.control.fileno(), select.POLLIN))
        if self.init_pidfd >= 0 and not self.exited and not self.exit_seen_at:
            entries.append((self.init_pidfd, select.POLLIN))
        if not self.exited:
            entries.append((self.attach.fileno(), select.POLLIN))
        for fd in self.outputs:
            entries.append((fd, select.POLLIN))
        if self.oom_fd >= 0:
            entries.append((self.oom_fd, select.POLLPRI))
        if self.stdin_fd >= 0 and self.stdin_pending and self.stdin_fd not in self.outputs:
            entries.append((self.stdin_fd, select.POLLOUT))
        if len(self.stdin_pending) < READ_CHUNK * 16:
            for fd in self.attach_clients:
                # A half-closed client is still watched for POLLHUP (gone for good).
                entries.append((fd, 0 if fd in self.attach_input_done else select.POLLIN))
        merged: dict[int, int] = {}
        for fd, mask in entries:
            merged[fd] = merged.get(fd, 0) | mask
        if self.stdin_fd >= 0 and self.stdin_pending and self.stdin_fd in merged:
            merged[self.stdin_fd] |= select.POLLOUT
        for fd, mask in merged.items():
            poller.register(fd, mask)
        return list(merged.items())

    def poll_timeout(self, drain_until: float) -> int:
        now = time.monotonic()
        deadlines = [waiter[1] for waiter in self.stop_waiters]
        if self.exit_seen_at and not self.exited:
            deadlines.append(now + 0.01)  # the keeper's record is due any moment
        if drain_until:
            deadlines.append(drain_until)
        if not deadlines:
            return -1
        return min(MAX_POLL_MS, max(0, int((min(deadlines) - now) * 1000) + 1))

    def dispatch(self, fd: int, event: int) -> None:
        if fd == self.init_pidfd:
            self.exit_seen_at = time.monotonic()
            self.check_adopted_exit()
        elif fd == self.wakeup_r:
            try:
                while os.read(self.wakeup_r, 512):
                    pass
            except BlockingIOError:
                pass
            self.reap()
        elif fd == self.control.fileno():
            self.accept_control()
        elif fd == self.oom_fd:
            self.read_oom_events()
        elif fd == self.attach.fileno():
            conn = accept(self.attach)
            conn.settimeout(ATTACH_SEND_TIMEOUT)
            self.attach_clients[conn.fileno()] = conn
        elif fd in self.outputs or fd == self.stdin_fd:
            if event & select.POLLOUT:
                self.flush_stdin()
            if fd in self.outputs and event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self.read_output(fd)
        elif fd in self.attach_clients:
            if fd in self.attach_input_done:
                if event & (select.POLLHUP | select.POLLERR):
                    self.drop_attach_client(fd)
            else:
                self.read_attach_client(fd)

    # --- container output -----------------------------------------------

    def read_chunk(self, fd: int) -> memoryview | None:
        """fd's next output, in the shim's one read buffer (valid until the
        next read): None while there is none, empty at end of file."""
        if self.read_buffer is None:
            self.read_buffer = bytearray(READ_CHUNK)
        try:
            count = os.readv(fd, [self.read_buffer])
        except BlockingIOError:
            return None
        except OSError:  # EIO: the pty's other side is gone
            count = 0
        return memoryview(self.read_buffer)[:count]

    def read_output(self, fd: int) -> bool:
        """Forward one chunk of fd's output; False once there is nothing to read."""
        data = self.read_chunk(fd)
        if data is None:
            return False
        if not data:
            self.close_output(fd)
            return False
        self.output_since_trim = True
        self.forward(self.outputs[fd], data)
        data.release()
        return True

    def forward(self, stream: bytes, data: memoryview) -> None:
        """Output goes to the log, and to every attached client."""
        self.log.write(stream, data)
        if self.attach_clients:
            packet = [STREAM_STDOUT if stream == b"stdout" else STREAM_STDERR, data]
            for client_fd, client in list(self.attach_clients.items()):
                try:
                    client.sendmsg(packet)  # one SEQPACKET packet: stream id, then the data
                except OSError:
                    self.drop_attach_client(client_fd)

    def drain_available(self) -> None:
        for fd in list(self.outputs):
            for _ in range(64):
                if fd not in self.outputs or not self.read_output(fd):
                    break

    def close_output(self, fd: int) -> None:
        stream = self.outputs.pop(fd)
        if stream not in self.outputs.values():
            self.log.flush_partial(stream)
        if fd == self.stdin_fd:
            self.stdin_fd = -1
        os.close(fd)

    # --- attach ----------------------------------------------------------

    def read_attach_client(self, fd: int) -> None:
        client = self.attach_clients[fd]
        try:
            data = client.recv(READ_CHUNK)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            data = b""
        if data:
            if self.stdin_fd >= 0:
                self.stdin_pending += data
                self.flush_stdin()
            return
        # The client shut down its sending side (stdin EOF for stdin_once);
        # it keeps receiving output until it closes or the container exits.
        self.attach_input_done.add(fd)
        if self.stdin_once:
            self.close_stdin()

    def drop_attach_client(self, fd: int) -> None:
        client = self.attach_clients.pop(fd, None)
        self.attach_input_done.discard(fd)
        if client is not None:
            client.close()

    def flush_stdin(self) -> None:
        while self.stdin_pending and self.stdin_fd >= 0:
            try:
                written = os.write(self.stdin_fd, self.stdin_pending)
            except BlockingIOError:
                return
            except OSError:
                self.stdin_pending = b""
                self.close_stdin()
                return
            self.stdin_pending = self.stdin_pending[written:]

    def close_stdin(self) -> None:
        if self.stdin_fd >= 0 and self.stdin_fd not in self.outputs:
            os.close(self.stdin_fd)
            self.stdin_fd = -1
        elif self.stdin_fd >= 0 and self.tty:
            # A pty has no half-close: send the terminal's EOF character.
            try:
                os.write(self.stdin_fd, b"\x04")
            except OSError:
                pass

    def read_oom_events(self) -> None:
        """Re-read memory.events (which also re-arms its poll) for the oom_kill count."""
        try:
            data = os.pread(self.oom_fd, 4096, 0)
        except OSError:  # ENODEV: the cgroup is gone
            os.close(self.oom_fd)
            self.oom_fd = -1
            return
        for line in data.split(b"\n"):
            if line.startswith(b"oom_kill "):
                self.oom_kills = max(self.oom_kills, int(line[9:]))

    # --- exit --------------------------------------------------------------

    def check_adopted_exit(self) -> None:
        """The re-adopted init has exited: take its status from the keeper's
        records once the keeper has reaped it (polled from the loop)."""
        status = keeper_exit_status(self.spec["reaped_file"], self.pid)
        if status is not None:
            self.container_exited(status)
        elif time.monotonic() - self.exit_seen_at > KEEPER_RECORD_WAIT_SECONDS:
            # The keeper is gone too: the status is lost (255, as for any lost exit).
            self.container_exited(255 << 8)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid and not self.exited:
                self.container_exited(status)

    def container_exited(self, status: int) -> None:
        exited_at = time.time_ns()
        if os.WIFSIGNALED(status):
            exit_code = 128 + os.WTERMSIG(status)
        else:
            exit_code = os.WEXITSTATUS(status)
        self.exited = True
        # Output already in the pipes belongs in the log before the exit is
        # announced: whoever reads the exit file next reads the log too.
        self.drain_available()
        if self.oom_fd >= 0:
            self.read_oom_events()
        oom_killed = max(self.oom_kills, read_oom_kills(self.spec.get("oom_files", []))) > 0
        if self.oom_fd >= 0:
            os.close(self.oom_fd)
            self.oom_fd = -1
        self.exit_record = {"exit_code": exit_code, "exited_at": exited_at, "oom_killed": oom_killed, "pid": self.pid}
        atomic_write(self.spec["exit_file"], compact_json.dumps(self.exit_record))
        self.announce_exit()
        for fd in list(self.attach_clients):
            self.drop_attach_client(fd)
        if self.stdin_fd >= 0 and self.stdin_fd not in self.outputs:
            self.close_stdin()
        for waiter in self.stop_waiters:
            self.reply(waiter[0], {"ok": True, "exit": self.exit_record})
        self.stop_waiters.clear()

    def announce_exit(self) -> None:
        """Tell shimd the exit file is there (services/shimd/events.py): one
        datagram with the container id. Best effort: shimd sweeps for exit
        files it was not told about, and a shimd that is down is restarted
        into a new event epoch anyway."""
        path = self.spec.get("exit_notify_socket")
        if not path:
            return
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        try:
            sock.settimeout(1.0)
            sock.sendto(self.spec["container_id"].encode(), path)
        except OSError:
            pass
        finally:
            sock.close()

    def check_stop_deadlines(self) -> None:
        now = time.monotonic()
        for waiter in list(self.stop_waiters):
            if waiter[1] > now:
                continue
            if not waiter[2]:
                self.signal_container(_signal.SIGKILL)
                waiter[1], waiter[2] = now + KILL_GRACE_SECONDS, True
            else:
                self.stop_waiters.remove(waiter)
                self.reply(waiter[0], {"ok": False, "error": "the container did not exit after SIGKILL"})

    def signal_container(self, signum: int) -> None:
        if self.exited:
            return
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def finish(self) -> None:
        for sock in (self.control, self.attach):
            try:
                os.unlink(sock.getsockname())
            except OSError:
                pass
            sock.close()
        # Only the warm-up lives on after this: it must not leak the fds.
        _signal.set_wakeup_fd(-1)
        for fd in (self.wakeup_r, self.wakeup_w, self.log.fd):
            if fd >= 0:
                os.close(fd)

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


def run(spec_bytes: bytes, notify_fd: int, pipes: tuple[int, ...] = ()) -> None:
    """The shim's life, in the process the zygote forked for it. Never returns.

    pipes: the container's stdio pipes (shim_setup.stdio_pipes), whose far
    ends its keeper holds; none for a shim that re-adopts a running
    container (the spec says "adopt").
    """
    code = 1
    try:
        code = supervise(spec_bytes, notify_fd, pipes=pipes)
    except BaseException as exc:  # last resort: leave a trace in shim.log
        try:
            os.write(2, f"shim: {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def supervise(spec_bytes: bytes, notify_fd: int, on_ready: Callable[[Shim], None] | None = None,
              pipes: tuple[int, ...] = ()) -> int:
    """Have the container created by a setup helper, then serve it until it
    exited and its output is drained; the exit code for the shim.

    on_ready replaces taking over the helper's stdio (the warm-up's hook).
    """
    os.umask(0o022)
    # Orphans of the container (its init, once the runtime exits, and any
    # process of a shared PID namespace) are reparented here.
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    shim_end, helper_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            shim_end.close()
            code = shim_setup.set_up(spec_bytes, notify_fd, helper_end, os.getppid(), pipes)
        finally:
            os._exit(code)
    helper_end.close()
    os.close(notify_fd)
    for fd in pipes:  # the helper hands over the ends the shim keeps
        os.close(fd)
    try:
        handoff, fds = receive_fds(shim_end, 4096, 16)
    finally:
        shim_end.close()
        os.waitpid(helper, 0)
    if not handoff:
        return 1  # the helper told shimd why
    shim = Shim(spec_bytes, handoff, fds)
    if on_ready is None:
        shim.adopt_stdio()
    else:
        on_ready(shim)
    shim.serve()
    return 0


# Requests a warm-up sends to its own shim, so the request paths are warm
# too; "stop" comes last and ends the stand-in container.
WARM_UP_REQUESTS = (
    {"op": "state"},
    {"op": "reopen_log"},
    {"op": "resize", "width": 80, "height": 24},
    {"op": "kill", "signal": 0},
    {"op": "warm-up"},
    {"op": "stop", "signal": int(_signal.SIGTERM), "timeout": 10},
)


def warm_up(scratch_dir: str, rounds: int = 10) -> None:
    """Run whole shim lives in the zygote before it forks any shim.

    CPython specializes bytecode in place as it runs, and fills its method
    cache and other caches on first use; a shim doing that itself would
    copy every page it touched (one first method lookup on a type copies
    about 170 KiB). Here the "runtime" is /bin/true and the "container" a
    sleep, so the hand-over, the poll loop, the control requests, reaping,
    the exit file and the log writer all run (and settle) in pages the
    shims then share.
    """
    sleep = "/bin/sleep" if os.path.exists("/bin/sleep") else "/usr/bin/sleep"
    for round_number in range(rounds):
        base = os.path.join(scratch_dir, str(round_number))
        os.mkdir(base)
        container = os.posix_spawn(sleep, [sleep, "10"], os.environ)
        with open(os.path.join(base, "pid"), "w") as handle:
            handle.write(str(container))
        spec = {
            "container_id": "warm-up", "runtime_path": "/bin/true", "runtime_root": base, "bundle": base,
            "pid_file": os.path.join(base, "pid"), "runtime_log": os.path.join(base, "runtime.log"),
            "log_path": os.path.join(base, "log"), "exit_file": os.path.join(base, "exit.json"),
            "control_socket": os.path.join(base, "ctl"), "attach_socket": os.path.join(base, "attach"),
            "shim_log": os.path.join(base, "shim.log"), "create_timeout": 10, "oom_files": ["/proc/self/status"],
        }
        notify_read, notify_write = os.pipe()
        clients: list[_socket.socket] = []

        def connect_clients(shim: Shim) -> None:
            shim.close_stdio_fds()
            shim.log.write(b"stdout", b"warm\nup " * 4 + b"x" * (MAX_LOG_LINE + 1))
            for request in WARM_UP_REQUESTS:
                client = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                client.connect(spec["control_socket"])
                client.sendall(compact_json.dumps(request) + b"\n")
                clients.append(client)

        try:
            supervise(compact_json.dumps(spec), notify_write, connect_clients)
        finally:
            os.close(notify_read)
            for client in clients:
                client.close()
            _signal.set_wakeup_fd(-1)
            _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        for name in os.listdir(base):
            os.unlink(os.path.join(base, name))
        os.rmdir(base)
