"""The per-container shim: CRI-O's conmon, in a few hundred lines of Python.

One shim supervises exactly one container. It is forked from the shim zygote
(services/shimd/zygote.py), so it shares the interpreter's pages with every
other shim and touches as little memory as it can: one poll loop, no threads,
no ZeroMQ, no protobuf. Everything here imports only light stdlib modules,
all loaded in the zygote before it forks.

What it does:
- runs `<runtime> create` for the container, holding its stdio (pipes, or a
  pty received over --console-socket for tty containers), and becomes the
  child subreaper so the container's init is its child and is reaped here;
- writes the CRI log format (`<RFC3339Nano> <stream> <P|F> <content>`);
- the moment the container's init exits, writes the exit file (exit code,
  time, OOM kill) atomically: it is the truth even if every service is down;
- answers one-line JSON requests on a unix socket (state, stop, kill, exec,
  reopen_log, resize) and serves the attach socket (SOCK_SEQPACKET, see
  docs/ARCHITECTURE.md);
- exits once the container has exited and its output is drained.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import json
import os
import select
import _signal
import signal
import socket
import struct
import termios
import time

# typing is a large module the zygote (and so every shim) would carry for
# annotations alone: they are strings here, so it is only for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# A log line longer than this is written in parts marked P (as conmon does).
MAX_LOG_LINE = 16 * 1024
READ_CHUNK = 64 * 1024
# ExecSync output kept per stream; the rest is read and discarded so the
# exec'd command never blocks, and the caller learns it was truncated.
DEFAULT_EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024
# How long the shim keeps draining the container's output after its init
# exited (processes of a shared PID namespace may hold the pipes open).
DRAIN_SECONDS = 2.0
# Extra time a stop waits for the exit after SIGKILL before it answers.
KILL_GRACE_SECONDS = 10.0
ATTACH_SEND_TIMEOUT = 5.0

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

STREAM_STDOUT = b"\x02"
STREAM_STDERR = b"\x03"


# Resolved once in the zygote, so a shim does not build ctypes objects.
_libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
_libc_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def prctl(option: int, value: int) -> None:
    if _libc_prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def rfc3339_nano(now_ns: int) -> bytes:
    seconds, nanos = divmod(now_ns, 1_000_000_000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%09dZ" % nanos).encode()


def atomic_write(path: str, data: bytes) -> None:
    # Not common.state's: that one brings tempfile and pathlib (and random's
    # after-fork hook) into the zygote, which every shim would pay for.
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGCHLD only has to wake the poll loop (through the wakeup fd)."""


def read_small_file(path: str) -> bytes:
    # os.read, not open(): the io stack would be one more code path whose
    # pages every shim copies.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).strip()
    finally:
        os.close(fd)


def set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


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


def runtime_error(log_path: str, fallback: str) -> str:
    """The last error runc/crun wrote to its --log file (JSON lines)."""
    message = ""
    try:
        with open(log_path, "rb") as handle:
            for raw in handle.read()[-65536:].splitlines():
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if entry.get("level") in ("error", "fatal") and entry.get("msg"):
                    message = entry["msg"]
    except OSError:
        pass
    return message or fallback.strip() or "runtime failed without a message"


class LogWriter:
    """The CRI log file of one container, reopened on request."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.partial = {b"stdout": b"", b"stderr": b""}
        self.reopen()

    def reopen(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def _emit(self, stream: bytes, tag: bytes, content: bytes, out: list[bytes]) -> None:
        out.append(b"%s %s %s %s\n" % (rfc3339_nano(time.time_ns()), stream, tag, content))

    def write(self, stream: bytes, data: bytes) -> None:
        buffer = self.partial[stream] + data
        out: list[bytes] = []
        while True:
            newline = buffer.find(b"\n")
            if 0 <= newline <= MAX_LOG_LINE:
                self._emit(stream, b"F", buffer[:newline], out)
                buffer = buffer[newline + 1 :]
            elif len(buffer) > MAX_LOG_LINE:
                # More than a full line's worth with no newline in it yet.
                self._emit(stream, b"P", buffer[:MAX_LOG_LINE], out)
                buffer = buffer[MAX_LOG_LINE:]
            else:
                break
        self.partial[stream] = buffer
        self._write_out(out)

    def flush_partial(self, stream: bytes) -> None:
        """At EOF a line without its newline is written as a part (P)."""
        if self.partial[stream]:
            out: list[bytes] = []
            self._emit(stream, b"P", self.partial[stream], out)
            self.partial[stream] = b""
            self._write_out(out)

    def _write_out(self, out: list[bytes]) -> None:
        if self.fd < 0 or not out:
            return
        data = b"".join(out)
        while data:
            try:
                written = os.write(self.fd, data)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return  # a full disk must not kill the container's supervisor
            data = data[written:]


class Shim:
    def __init__(self, spec: dict[str, Any], notify_fd: int) -> None:
        self.spec = spec
        self.notify_fd = notify_fd
        self.container_id: str = spec["container_id"]
        self.runtime = [spec["runtime_path"], "--root", spec["runtime_root"]]
        self.tty = bool(spec.get("tty"))
        self.stdin_enabled = bool(spec.get("stdin"))
        self.stdin_once = bool(spec.get("stdin_once"))
        self.exit_file: str = spec["exit_file"]
        self.pid = 0
        self.exited = False
        self.exit_record: dict[str, Any] | None = None
        self.log = LogWriter(spec.get("log_path", ""))
        # fd -> stream name for the container's output (pipes or pty master).
        self.outputs: dict[int, bytes] = {}
        self.stdin_fd = -1
        self.stdin_pending = b""
        self.attach_clients: dict[int, socket.socket] = {}
        # Clients that shut down their sending side: they still get output.
        self.attach_input_done: set[int] = set()
        self.stop_waiters: list[list[Any]] = []  # [conn, deadline, killed]
        self.control: socket.socket | None = None
        self.attach: socket.socket | None = None
        self.wakeup_r = -1
        self.wakeup_w = -1

    # --- start -----------------------------------------------------------

    def notify(self, message: dict[str, Any]) -> None:
        if self.notify_fd >= 0:
            try:
                os.write(self.notify_fd, json.dumps(message).encode() + b"\n")
            except OSError:
                pass

    def listen(self, path: str, kind: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # A stale socket file (paths are per container, so rarely): replace it.
            os.unlink(path)
            sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
        return sock

    def create(self) -> None:
        spec = self.spec
        self.control = self.listen(spec["control_socket"], socket.SOCK_STREAM)
        self.attach = self.listen(spec["attach_socket"], socket.SOCK_SEQPACKET)
        pid_file = spec["pid_file"]
        runtime_log = spec["runtime_log"]
        args = self.runtime + [f"--log={runtime_log}", "--log-format=json", "create", "--bundle", spec["bundle"], "--pid-file", pid_file]
        console: socket.socket | None = None
        child_fds: list[int] = []
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        if self.tty:
            console_path = spec["control_socket"] + ".console"
            console = self.listen(console_path, socket.SOCK_STREAM)
            args += ["--console-socket", console_path]
            stdio = (devnull, devnull, devnull)
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            self.outputs = {out_r: b"stdout", err_r: b"stderr"}
            child_fds = [out_w, err_w]
            stdin = devnull
            if self.stdin_enabled:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                stdin, self.stdin_fd = in_r, in_w
                child_fds.append(in_r)
            stdio = (stdin, out_w, err_w)
        args.append(self.container_id)
        try:
            returncode, message = run_in_helper(args, stdio, float(spec.get("create_timeout", 60)), runtime_log)
        finally:
            for fd in child_fds:
                os.close(fd)
            os.close(devnull)
        master = -1
        if console is not None:
            # runc sent the pty master on a connection still in the backlog.
            if returncode == 0 and select.select([console], [], [], 5.0)[0]:
                master = self.receive_console(console)
            console.close()
            try:
                os.unlink(spec["control_socket"] + ".console")
            except FileNotFoundError:
                pass
        if returncode != 0:
            raise RuntimeError(message)
        if self.tty:
            if master < 0:
                raise RuntimeError("the runtime sent no console for the tty container")
            self.outputs = {master: b"stdout"}
            self.stdin_fd = master if self.stdin_enabled else -1
        self.pid = int(read_small_file(pid_file))

    @staticmethod
    def receive_console(console: socket.socket) -> int:
        conn, _ = console.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        if not fds:
            raise RuntimeError("console socket message carried no file descriptor")
        for extra in fds[1:]:
            os.close(extra)
        return fds[0]

    # --- the loop ----------------------------------------------------------

    def serve(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        set_nonblocking(self.wakeup_r)
        signal.set_wakeup_fd(self.wakeup_w)
        # _signal, not signal.signal: that wrapper converts through enum
        # machinery, one more code path each shim would copy pages of.
        _signal.signal(signal.SIGCHLD, _ignore_signal)
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
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                events = []
            for fd, _ in registered:
                poller.unregister(fd)
            for fd, event in events:
                self.dispatch(fd, event)
            self.check_stop_deadlines()
        for fd in list(self.outputs):
            self.close_output(fd)
        self.finish()

    def register(self, poller: select.poll) -> list[tuple[int, int]]:
        entries: list[tuple[int, int]] = [(self.wakeup_r, select.POLLIN)]
        assert self.control is not None and self.attach is not None
        entries.append((self.control.fileno(), select.POLLIN))
        if not self.exited:
            entries.append((self.attach.fileno(), select.POLLIN))
        for fd in self.outputs:
            entries.append((fd, select.POLLIN))
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
        if drain_until:
            deadlines.append(drain_until)
        if not deadlines:
            return -1
        return max(0, int((min(deadlines) - now) * 1000) + 1)

    def dispatch(self, fd: int, event: int) -> None:
        if fd == self.wakeup_r:
            try:
                while os.read(self.wakeup_r, 512):
                    pass
            except BlockingIOError:
                pass
            self.reap()
        elif self.control is not None and fd == self.control.fileno():
            self.accept_control()
        elif self.attach is not None and fd == self.attach.fileno():
            conn, _ = self.attach.accept()
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

    def read_output(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's other side is gone
            data = b""
        if not data:
            self.close_output(fd)
            return
        self.forward(self.outputs[fd], data)

    def forward(self, stream: bytes, data: bytes) -> None:
        """Output goes to the log, and to every attached client."""
        self.log.write(stream, data)
        if self.attach_clients:
            packet = (STREAM_STDOUT if stream == b"stdout" else STREAM_STDERR) + data
            for client_fd, client in list(self.attach_clients.items()):
                try:
                    client.sendall(packet)
                except OSError:
                    self.drop_attach_client(client_fd)

    def drain_available(self) -> None:
        for fd in list(self.outputs):
            for _ in range(64):
                if fd not in self.outputs:
                    break
                try:
                    data = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    self.close_output(fd)
                    break
                self.forward(self.outputs[fd], data)

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
        except (BlockingIOError, socket.timeout):
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

    # --- exit --------------------------------------------------------------

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
        oom_killed = read_oom_kills(self.spec.get("oom_files", [])) > 0
        self.exit_record = {"exit_code": exit_code, "exited_at": exited_at, "oom_killed": oom_killed, "pid": self.pid}
        atomic_write(self.exit_file, json.dumps(self.exit_record).encode())
        for fd in list(self.attach_clients):
            self.drop_attach_client(fd)
        if self.stdin_fd >= 0 and self.stdin_fd not in self.outputs:
            self.close_stdin()
        for waiter in self.stop_waiters:
            self.reply(waiter[0], {"ok": True, "exit": self.exit_record})
        self.stop_waiters.clear()

    def check_stop_deadlines(self) -> None:
        now = time.monotonic()
        for waiter in list(self.stop_waiters):
            if waiter[1] > now:
                continue
            if not waiter[2]:
                self.signal_container(signal.SIGKILL)
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
            if sock is not None:
                try:
                    os.unlink(sock.getsockname())
                except OSError:
                    pass
                sock.close()

    # --- requests ------------------------------------------------------------

    def reply(self, conn: socket.socket, message: dict[str, Any]) -> None:
        try:
            conn.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            pass
        conn.close()

    def accept_control(self) -> None:
        assert self.control is not None
        conn, _ = self.control.accept()
        conn.settimeout(2.0)
        try:
            raw = b""
            while not raw.endswith(b"\n") and len(raw) < 1 << 20:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                raw += chunk
            request = json.loads(raw)
        except (OSError, ValueError):
            conn.close()
            return
        op = request.get("op")
        try:
            if op == "state":
                self.reply(conn, {"ok": True, "pid": self.pid, "running": not self.exited, "exit": self.exit_record})
            elif op == "stop":
                self.handle_stop(conn, request)
            elif op == "kill":
                self.signal_container(int(request.get("signal", signal.SIGKILL)))
                self.reply(conn, {"ok": True})
            elif op == "reopen_log":
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

    def handle_stop(self, conn: socket.socket, request: dict[str, Any]) -> None:
        if self.exited:
            self.reply(conn, {"ok": True, "exit": self.exit_record})
            return
        timeout = float(request.get("timeout", 0))
        if timeout <= 0:
            self.signal_container(signal.SIGKILL)
            self.stop_waiters.append([conn, time.monotonic() + KILL_GRACE_SECONDS, True])
        else:
            self.signal_container(int(request.get("signal", signal.SIGTERM)))
            self.stop_waiters.append([conn, time.monotonic() + timeout, False])

    def resize(self, width: int, height: int) -> None:
        if not self.tty or not self.outputs:
            raise ValueError("the container has no terminal")
        master = next(iter(self.outputs))
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def spawn_exec(self, conn: socket.socket, request: dict[str, Any]) -> None:
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
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            keep = conn.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, 65536)
            conn.settimeout(None)
            try:
                result = run_exec(self.runtime, self.container_id, request)
            except Exception as exc:
                os.write(2, f"exec failed: {type(exc).__name__}: {exc}\n".encode())
                result = {"ok": False, "error": f"exec failed: {type(exc).__name__}: {exc}"}
            self.reply(conn, result)
        finally:
            os._exit(0)


def spawn(args: list[str], stdio: tuple[int, int, int]) -> int:
    """posix_spawn with the given stdio (every other fd of the shim is close-on-exec).

    Not subprocess: its Python-level machinery would dirty pages the shims
    otherwise share."""
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
    return os.posix_spawn(args[0], args, os.environ, file_actions=actions)


def run_in_helper(args: list[str], stdio: tuple[int, int, int], timeout: float, runtime_log: str) -> tuple[int, str]:
    """Run `<runtime> create` and wait for it in a short-lived child.

    The waiting and error parsing then dirty the helper's pages, which go
    away with it, instead of the shim's. The container's init still ends up
    the shim's child: the helper is no subreaper, the shim is.
    Returns (exit code, error message).
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            os.close(read_fd)
            code, message = wait_runtime(args, stdio, timeout, runtime_log)
            os.write(write_fd, message.encode(errors="replace"))
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(helper, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, b"".join(chunks).decode(errors="replace") or f"the runtime helper exited with {code}"


def wait_runtime(args: list[str], stdio: tuple[int, int, int], timeout: float, runtime_log: str) -> tuple[int, str]:
    try:
        runtime_pid = spawn(args, stdio)
    except OSError as exc:
        return 1, f"cannot run {args[0]}: {exc}"
    deadline = time.monotonic() + timeout
    while True:
        returncode = poll_child(runtime_pid)
        if returncode is not None:
            break
        if time.monotonic() > deadline:
            os.kill(runtime_pid, signal.SIGKILL)
            os.waitpid(runtime_pid, 0)
            return 1, f"{args[0]} create did not finish within {timeout:g}s"
        time.sleep(0.003)
    if returncode != 0:
        return 1, runtime_error(runtime_log, f"{args[0]} create exited with {returncode}")
    return 0, ""


def poll_child(pid: int) -> int | None:
    """The exit code of a child that ended (reaping it), None while it runs."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if not done:
        return None
    return os.waitstatus_to_exitcode(status)


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
        "stdout": base64.b64encode(bytes(streams[out_r])).decode(),
        "stderr": base64.b64encode(bytes(streams[err_r])).decode(),
        "exit_code": returncode if returncode >= 0 else 128 - returncode,
        "timed_out": timed_out,
        "truncated": truncated,
    }


def kill_exec(pid_file: str, runtime_pid: int) -> None:
    # runc exec does not pass SIGKILL on: kill the exec'd process itself.
    try:
        with open(pid_file) as handle:
            os.kill(int(handle.read().strip()), signal.SIGKILL)
    except (OSError, ValueError):
        # Not started yet (or gone): end the runtime's exec instead.
        try:
            os.kill(runtime_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(spec: dict[str, Any], notify_fd: int) -> None:
    """The shim's life, in the process the zygote made for it. Never returns."""
    code = 0
    try:
        os.umask(0o022)
        # Orphans of the container (in a shared PID namespace) are reaped here.
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        os.set_inheritable(notify_fd, False)
        shim = Shim(spec, notify_fd)
        # Hand-formatted: the success path stays clear of the JSON encoder.
        os.write(notify_fd, b'{"shim_pid": %d}\n' % os.getpid())
        try:
            shim.create()
        except Exception as exc:
            shim.notify({"ok": False, "error": str(exc)})
            shim.finish()
            os._exit(1)
        os.write(notify_fd, b'{"ok": true, "pid": %d}\n' % shim.pid)
        os.close(notify_fd)
        shim.notify_fd = -1
        shim.serve()
    except BaseException as exc:  # last resort: leave a trace for shimd
        try:
            os.write(2, f"shim {spec.get('container_id')}: {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
        code = 1
    finally:
        os._exit(code)


def warm_up(scratch_dir: str, rounds: int = 10) -> None:
    """Run a whole shim life in the zygote before it forks any shim.

    CPython specializes bytecode in place as it runs and builds caches on
    first use; a shim that did that itself would copy every page it
    touched. Here the "runtime" is /bin/true and the "container" a short
    sleep, so create, the poll loop, reaping, the exit file and the log
    writer all run (and settle) in pages the shims then share.
    """
    sleep = "/bin/sleep" if os.path.exists("/bin/sleep") else "/usr/bin/sleep"
    for round_number in range(rounds):
        base = os.path.join(scratch_dir, str(round_number))
        os.mkdir(base)
        container = os.posix_spawn(sleep, [sleep, "0.02"], os.environ)
        with open(os.path.join(base, "pid"), "w") as handle:
            handle.write(str(container))
        spec = {
            "container_id": "warm-up", "runtime_path": "/bin/true", "runtime_root": base, "bundle": base,
            "pid_file": os.path.join(base, "pid"), "runtime_log": os.path.join(base, "runtime.log"),
            "log_path": os.path.join(base, "log"), "exit_file": os.path.join(base, "exit.json"),
            "control_socket": os.path.join(base, "ctl"), "attach_socket": os.path.join(base, "attach"),
            "create_timeout": 10, "oom_files": ["/proc/self/status"],
        }
        shim = Shim(spec, -1)
        shim.create()
        shim.log.write(b"stdout", b"warm\nup " * 4 + b"x" * (MAX_LOG_LINE + 1))
        shim.serve()
        json.loads(json.dumps({"op": "state", "ok": True, "exit": shim.exit_record}))
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (shim.wakeup_r, shim.wakeup_w, shim.log.fd):
            os.close(fd)
        for name in os.listdir(base):
            os.unlink(os.path.join(base, name))
        os.rmdir(base)

