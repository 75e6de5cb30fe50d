"""What a shim's setup helper does: create the container, hand its stdio
and sockets to the shim, and report to shimd.

The shim (shim.py) forks this helper first thing. Decoding the spec,
binding the sockets, running `<runtime> create` and waiting for it all
write memory; done here, those pages go away with the helper instead of
staying private to the long-lived shim (what a shim costs is what it writes
after it was forked: see zygote.py). The container's init still ends up the
shim's child: runc's parent is the helper, which is no subreaper, so the
orphaned init is reparented to the shim, which is.

Hand-off to the shim, one SEQPACKET message: b"<pid> <stdin> <stdin_once>
<role> <role> ...", with one fd attached per role, in that order (roles:
null, shim_log, control, attach, log, stdout, stderr, stdin, tty, oom). An empty
message means the create failed; the helper has told shimd why.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import select
import time

from services.shimd import compact_json
from services.shimd.shim_io import (
    KEEPER_REAPED_FD,
    KEEPER_STDERR_FD,
    KEEPER_STDIN_FD,
    KEEPER_STDOUT_FD,
    KEEPER_TTY_QUEUE_FD,
    KEEPER_TTY_SEND_FD,
    PR_SET_CHILD_SUBREAPER,
    accept,
    pidfd_getfd,
    prctl,
    receive_fds,
    send_fds,
    spawn,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# How long after a successful create the runtime may take to send the pty.
CONSOLE_WAIT_SECONDS = 5.0


# The container's stdio pipes, made before the shim is forked so that its
# keeper holds their far ends: (stdout r, w), (stderr r, w), (stdin r, w).
Pipes = "tuple[int, int, int, int, int, int]"
# Signals the keeper ignores (inherited through exec): only SIGKILL ends it.
KEEPER_IGNORED_SIGNALS = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGALRM")


def stdio_pipes() -> tuple[int, int, int, int, int, int]:
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    return out_r, out_w, err_r, err_w, in_r, in_w


def become_keeper(spec_bytes: bytes, program_fd: int, pipes: tuple[int, ...]) -> None:
    """Exec the keeper (keeper.py) with its fds in place; returns only on failure."""
    import _signal

    prctl(PR_SET_CHILD_SUBREAPER, 1)  # before the shim can die: its orphans come here
    spec = compact_json.loads(spec_bytes)
    reaped = os.open(spec["reaped_file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    out_r, out_w, err_r, err_w, in_r, in_w = pipes
    if spec.get("stdin_once"):
        # Its stdin must reach EOF when the shim closes it: the keeper keeps no write end.
        os.close(in_w)
        in_w = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    tty_queue, tty_send = (sock.detach() for sock in _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_DGRAM))
    # Targets 3-8 may be taken by these very fds: move them out of the way first.
    staged = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16)
              for fd in (reaped, out_r, err_r, in_w, tty_queue, tty_send, null, program_fd)]
    for fd in (reaped, out_r, out_w, err_r, err_w, in_r, in_w, tty_queue, tty_send, null, program_fd):
        os.close(fd)
    reaped, out_r, err_r, in_w, tty_queue, tty_send, null, program_fd = staged
    for target in (0, 1, 2):
        os.dup2(null, target)
    for fd, target in ((reaped, KEEPER_REAPED_FD), (out_r, KEEPER_STDOUT_FD), (err_r, KEEPER_STDERR_FD),
                       (in_w, KEEPER_STDIN_FD), (tty_queue, KEEPER_TTY_QUEUE_FD), (tty_send, KEEPER_TTY_SEND_FD)):
        os.dup2(fd, target)  # inheritable
    for name in KEEPER_IGNORED_SIGNALS:
        _signal.signal(getattr(_signal, name), _signal.SIG_IGN)
    # Nothing else of the zygote's reaches the keeper (program_fd closes at exec).
    os.closerange(KEEPER_TTY_SEND_FD + 1, program_fd)
    os.closerange(program_fd + 1, 65536)
    os.chdir("/")
    os.execve(f"/proc/self/fd/{program_fd}", ["pyrio-keeper", spec.get("container_id", "")[:12]], {})


def set_up(spec_bytes: bytes, notify_fd: int, result_sock: _socket.socket, shim_pid: int,
           pipes: tuple[int, ...] = ()) -> int:
    """The helper's whole life; returns its exit code."""
    spec = compact_json.loads(spec_bytes)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    shim_log = os.open(spec["shim_log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(shim_log, 2)  # the helper's own errors go to the shim's log too
    keeper_pid = int(spec["keeper_pid"]) if spec.get("adopt") else _keeper_of(shim_pid)
    write_line(notify_fd, b'{"shim_pid": %d, "keeper_pid": %d}' % (shim_pid, keeper_pid))
    handed: dict[str, int] = {"null": null, "shim_log": shim_log}
    try:
        if spec.get("adopt"):
            created = adopt(spec, handed)
        else:
            created = create(spec, handed, pipes)
            if "tty" in handed:
                keep_tty_with_keeper(keeper_pid, handed["tty"])
    except Exception as exc:
        for path in (spec["control_socket"], spec["attach_socket"]):
            remove(path)
        write_line(notify_fd, compact_json.dumps({"ok": False, "error": str(exc)}))
        return 1
    header = b"%d %d %d " % (created, bool(spec.get("stdin")), bool(spec.get("stdin_once")))
    send_fds(result_sock, header + " ".join(handed).encode(), list(handed.values()))
    write_line(notify_fd, b'{"ok": true, "pid": %d}' % created)
    return 0


def keep_tty_with_keeper(keeper_pid: int, master: int) -> None:
    """Queue a copy of the pty master in the keeper's socketpair: the copy a
    new shim takes (adopt) when this shim dies."""
    keeper = os.pidfd_open(keeper_pid)
    try:
        sender = _socket.socket(fileno=pidfd_getfd(keeper, KEEPER_TTY_SEND_FD))
    finally:
        os.close(keeper)
    try:
        send_fds(sender, b"tty", [master])
    finally:
        sender.close()


def _take_kept_tty(keeper: int) -> int:
    """The pty master the first shim queued with the keeper, queued again
    for the next shim that may need it."""
    queue = _socket.socket(fileno=pidfd_getfd(keeper, KEEPER_TTY_QUEUE_FD))
    try:
        queue.setblocking(False)
        _, fds = receive_fds(queue, 16, 1)
    except BlockingIOError:
        fds = []
    finally:
        queue.close()
    if len(fds) != 1:
        raise RuntimeError("the container's keeper holds no terminal: its tty cannot be taken over")
    sender = _socket.socket(fileno=pidfd_getfd(keeper, KEEPER_TTY_SEND_FD))
    try:
        send_fds(sender, b"tty", fds)
    finally:
        sender.close()
    return fds[0]


def _keeper_of(shim_pid: int) -> int:
    """The shim's parent: its keeper."""
    with open(f"/proc/{shim_pid}/stat", "rb") as handle:
        return int(handle.read().rsplit(b")", 1)[1].split()[1])


def adopt(spec: dict[str, Any], handed: dict[str, int]) -> int:
    """For a new shim of a running container whose shim died: listen on the
    shim's sockets again and take the container's stdio (pipes, or the pty
    master it keeps queued) from its keeper."""
    keeper = os.pidfd_open(int(spec["keeper_pid"]))
    try:
        if not _is_keeper(int(spec["keeper_pid"]), spec["container_id"]):
            raise RuntimeError("the container's keeper is gone: its output and exit cannot be taken over")
        handed["control"] = listen(spec["control_socket"], _socket.SOCK_STREAM).detach()
        handed["attach"] = listen(spec["attach_socket"], _socket.SOCK_SEQPACKET).detach()
        if spec.get("log_path"):
            handed["log"] = os.open(spec["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        if spec.get("tty"):
            handed["tty"] = _take_kept_tty(keeper)
        else:
            handed["stdout"] = pidfd_getfd(keeper, KEEPER_STDOUT_FD)
            handed["stderr"] = pidfd_getfd(keeper, KEEPER_STDERR_FD)
            if spec.get("stdin"):
                handed["stdin"] = pidfd_getfd(keeper, KEEPER_STDIN_FD)
        handed["init"] = os.pidfd_open(int(spec["pid"]))
    finally:
        os.close(keeper)
    return int(spec["pid"])


def _is_keeper(pid: int, container_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")[:2] == [b"pyrio-keeper", container_id[:12].encode()]
    except OSError:
        return False


def create(spec: dict[str, Any], handed: dict[str, int], pipes: tuple[int, ...] = ()) -> int:
    """Listen on the shim's sockets and run `<runtime> create`; the
    container's pid. Adds the fds the shim keeps to `handed`."""
    handed["control"] = listen(spec["control_socket"], _socket.SOCK_STREAM).detach()
    handed["attach"] = listen(spec["attach_socket"], _socket.SOCK_SEQPACKET).detach()
    if spec.get("log_path"):
        handed["log"] = os.open(spec["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    runtime_log = spec["runtime_log"]
    # runtime_flags: --systemd-cgroup with the systemd cgroup driver.
    args = [spec["runtime_path"], "--root", spec["runtime_root"], *spec.get("runtime_flags", ()),
            f"--log={runtime_log}", "--log-format=json",
            "create", "--bundle", spec["bundle"], "--pid-file", spec["pid_file"]]
    null = handed["null"]
    console: _socket.socket | None = None
    console_path = spec["control_socket"] + ".console"
    if spec.get("tty"):
        console = listen(console_path, _socket.SOCK_STREAM)
        args += ["--console-socket", console_path]
        stdio = (null, null, null)
    else:
        out_r, out_w, err_r, err_w, in_r, in_w = pipes or stdio_pipes()
        handed["stdout"], handed["stderr"] = out_r, err_r
        stdin = null
        if spec.get("stdin"):
            stdin, handed["stdin"] = in_r, in_w
        else:
            os.close(in_r)
            os.close(in_w)
        stdio = (stdin, out_w, err_w)
    args.append(spec["container_id"])
    try:
        run_runtime(args, stdio, float(spec.get("create_timeout", 60)), runtime_log)
        watch_oom_events(spec, handed)
        if console is not None:
            # runc sent the pty master on a connection still in the backlog.
            if not select.select([console], [], [], CONSOLE_WAIT_SECONDS)[0]:
                raise RuntimeError("the runtime sent no console for the tty container")
            handed["tty"] = receive_console(console)
    finally:
        for fd in stdio:
            if fd != null:
                os.close(fd)
        if console is not None:
            console.close()
            remove(console_path)
    return int(read_small_file(spec["pid_file"]))


def watch_oom_events(spec: dict[str, Any], handed: dict[str, int]) -> None:
    """Hand the shim the container's cgroup v2 memory.events, open, to poll while the container
    runs: its scope's cgroup (systemd driver) may be gone by the time the shim reads it after the
    exit, and the oom_kill count with it. v1 files are read at the exit (runc deletes them later)."""
    for path in spec.get("oom_files") or ():
        if path.endswith("/memory.events"):
            try:
                handed["oom"] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # no memory controller there: read at the exit as on v1
            return


def listen(path: str, kind: int) -> _socket.socket:
    sock = _socket.socket(_socket.AF_UNIX, kind)  # close-on-exec, as Python makes every fd
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


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def receive_console(console: _socket.socket) -> int:
    conn = accept(console)
    try:
        _, fds = receive_fds(conn, 4096, 4)
    finally:
        conn.close()
    if not fds:
        raise RuntimeError("console socket message carried no file descriptor")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


def run_runtime(args: list[str], stdio: tuple[int, int, int], timeout: float, runtime_log: str) -> None:
    """Run `<runtime> create` to its end; RuntimeError with the runtime's own message."""
    try:
        runtime_pid = spawn(args, stdio)
    except OSError as exc:
        raise RuntimeError(f"cannot run {args[0]}: {exc}") from None
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(runtime_pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(runtime_pid, 9)
            os.waitpid(runtime_pid, 0)
            raise RuntimeError(f"{args[0]} create did not finish within {timeout:g}s")
        time.sleep(0.003)
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise RuntimeError(runtime_error(runtime_log, f"{args[0]} create exited with {returncode}"))


def runtime_error(log_path: str, fallback: str) -> str:
    """The last error runc/crun wrote to its --log file (JSON lines)."""
    message = ""
    try:
        with open(log_path, "rb") as handle:
            for raw in handle.read()[-65536:].splitlines():
                try:
                    entry = compact_json.loads(raw)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("level") in ("error", "fatal") and entry.get("msg"):
                    message = entry["msg"]
    except OSError:
        pass
    return message or fallback.strip() or "runtime failed without a message"


def read_small_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).strip()
    finally:
        os.close(fd)


def write_line(fd: int, message: bytes) -> None:
    """A line to shimd's notify pipe; shimd may have given up and closed it."""
    try:
        os.write(fd, message + b"\n")
    except OSError:
        pass
