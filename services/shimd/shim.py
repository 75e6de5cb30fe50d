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
  see docs/ARCHITECTURE.md); an exec's runtime is spawned from the loop,
  which reads its output (shim_exec.py);
- it exits once the container has exited and its output is drained.
The spec (JSON) is kept as bytes and decoded only when a rare path needs it
(the exit, reopening the log, the first exec).
"""

from __future__ import annotations

import _signal
import _socket
import os
import select
import time

from services.shimd import compact_json, shim_setup
from services.shimd.shim_control import ShimControl
from services.shimd.shim_exec import ShimExec
from services.shimd.shim_exit import ShimExit
from services.shimd.shim_io import PR_SET_CHILD_SUBREAPER, accept, prctl, receive_fds, set_nonblocking, trim_heap
from services.shimd.shim_log import READ_CHUNK, LogWriter

# typing is a large module the zygote (and so every shim) would carry for
# annotations alone: they are strings here, so it is only for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

# How long the shim keeps draining the container's output after its init
# exited (processes of a shared PID namespace may hold the pipes open).
DRAIN_SECONDS = 2.0
# A shim whose container went quiet this long after output trims its heap.
TRIM_AFTER_IDLE_MS = 1000
ATTACH_SEND_TIMEOUT = 5.0
# The longest single poll: deadlines further out (a week-long stop grace
# period) are re-checked each time, and poll takes an int of milliseconds.
MAX_POLL_MS = 3600 * 1000

STREAM_STDOUT = b"\x02"
STREAM_STDERR = b"\x03"


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGCHLD only has to wake the poll loop (through the wakeup fd)."""


class Shim(ShimControl, ShimExec, ShimExit):
    """The shim's serving half: the poll loop over what the setup helper handed over.

    Its control requests (shim_control.py), execs (shim_exec.py) and exit
    handling (shim_exit.py) are mixins, one module per concern."""

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
        self.exec_jobs = {}
        self.exec_fds = {}
        self._exec_runtime = None

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
                if (not self.outputs and not self.exec_jobs) or time.monotonic() > drain_until:
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
            self.check_exec_deadlines()
            if self.exit_seen_at and not self.exited:
                self.check_adopted_exit()
        if self.exec_jobs:
            self.end_execs()
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
        for fd in self.exec_fds:
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
        deadlines.extend(self.exec_deadlines())
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
        elif fd in self.exec_fds:
            self.read_exec_output(fd)
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
