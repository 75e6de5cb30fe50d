"""Exec: run `<runtime> --root <root> exec` for one streaming session.

The streaming server runs the runtime itself (the stream's lifetime is the
HTTP connection's). Without a TTY the runtime hands our pipes straight to
the process, so stdin EOF and output reach it unchanged. With a TTY the
runtime runs detached and sends us the master of the container's console
(as conmon has it), so a resize is TIOCSWINSZ on that master, and we reap the
command ourselves as subreaper. When the client goes away the process (and
whatever it started) is killed.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import select
import signal
import struct
import subprocess
import socket
import termios
import threading
import time
from pathlib import Path
from typing import Any

from common.errors import FailedPrecondition
from services.crigw.streaming.remotecommand import RemoteStreams

log = logging.getLogger("pyrio.crigw.streaming.exec")

# After the process exits, output still in the pipe is read until the pipe is
# quiet this long (a background child may hold it open forever).
DRAIN_QUIET_SECONDS = 0.2
# How long a TTY exec waits for the client's first terminal size before
# starting the process, so the command sees the right size from its start.
FIRST_SIZE_WAIT_SECONDS = 0.3


def set_window_size(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (they may be in the container's pid namespace)."""
    # Imported here: psutil costs an idle gateway about 1 MiB, and only a
    # failed or orphaned exec needs it.
    import psutil

    try:
        root = psutil.Process(pid)
        victims = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for process in victims:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def reap_orphaned_execs(pid_dir: Path) -> list[int]:
    """Kill the exec'd processes of a gateway that died: their clients are gone with it.

    Every running exec has a runc --pid-file in pid_dir; a file still there
    when crigw starts belongs to a session of a previous crigw. A process is
    only killed if it started before its pid file was written, so a reused
    pid is left alone. Returns the pids killed.
    """
    killed: list[int] = []
    pid_files = sorted(pid_dir.glob("exec-*.pid")) if pid_dir.is_dir() else []
    if not pid_files:
        return killed
    import psutil

    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().strip())
            written = pid_file.stat().st_mtime
            if psutil.Process(pid).create_time() <= written + 1.0:
                kill_process_tree(pid)
                killed.append(pid)
        except (OSError, ValueError, psutil.Error):
            pass
        pid_file.unlink(missing_ok=True)
        pid_file.with_suffix(".json").unlink(missing_ok=True)
    return killed


def _pump_to_stream(fd: int, stream: Any, exited: threading.Event) -> None:
    """Copy fd to a client stream until EOF, or until quiet after the process exited."""
    quiet_since: float | None = None
    while True:
        readable, _, _ = select.select([fd], [], [], 0.1)
        if not readable:
            if exited.is_set():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= DRAIN_QUIET_SECONDS:
                    return
            continue
        quiet_since = None
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the pty's other side is closed
            return
        if not chunk:
            return
        try:
            stream.write(chunk)
        except OSError:
            return


def _pump_from_stream(stream: Any, fd: int, close_at_eof: bool) -> None:
    try:
        while chunk := stream.read():
            os.write(fd, chunk)
    except OSError:
        pass
    finally:
        if close_at_eof:
            try:
                os.close(fd)
            except OSError:
                pass


class ExecSession:
    def __init__(self, exec_info: dict[str, Any], cmd: list[str], pid_dir: Path) -> None:
        self.runtime_path = str(exec_info["runtime_path"])
        self.runtime_root = str(exec_info["runtime_root"])
        self.runtime_id = str(exec_info["runtime_id"])
        self.cmd = cmd
        self.pid_file = pid_dir / f"exec-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}.pid"
        self.process_file = self.pid_file.with_suffix(".json")

    def _argv(self) -> list[str]:
        return [self.runtime_path, "--root", self.runtime_root, "exec", "--pid-file", str(self.pid_file), self.runtime_id, *self.cmd]

    def run(self, streams: RemoteStreams, cancelled: threading.Event) -> int:
        """Run to completion; the exit code. Kills the process if `cancelled` is set first."""
        self.pid_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            if streams.tty:
                return self._run_tty(streams, cancelled)
            return self._run_pipes(streams, cancelled)
        finally:
            self.pid_file.unlink(missing_ok=True)
            self.process_file.unlink(missing_ok=True)

    def _wait(self, process: subprocess.Popen, cancelled: threading.Event) -> int:
        while process.poll() is None:
            if cancelled.wait(0.05):
                self.kill(process)
                break
        return process.wait()

    def kill(self, process: subprocess.Popen) -> None:
        try:
            exec_pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            exec_pid = 0
        if exec_pid:
            kill_process_tree(exec_pid)
        # The runtime exits once its child is gone; make sure of it.
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            kill_process_tree(process.pid)

    def _run_pipes(self, streams: RemoteStreams, cancelled: threading.Event) -> int:
        pipe = subprocess.PIPE
        process = subprocess.Popen(
            self._argv(),
            stdin=pipe if streams.stdin else subprocess.DEVNULL,
            stdout=pipe if streams.stdout else subprocess.DEVNULL,
            stderr=pipe if streams.stderr else subprocess.DEVNULL,
            start_new_session=True,
        )
        exited = threading.Event()
        if streams.stdin is not None and process.stdin is not None:
            # Our own descriptor, closed by the pump at the client's EOF.
            stdin_fd = os.dup(process.stdin.fileno())
            process.stdin.close()
            threading.Thread(target=_pump_from_stream, args=(streams.stdin, stdin_fd, True), daemon=True).start()
        outputs = [(streams.stdout, process.stdout), (streams.stderr, process.stderr)]
        pumps = [
            threading.Thread(target=_pump_to_stream, args=(source.fileno(), stream, exited), daemon=True)
            for stream, source in outputs
            if stream is not None and source is not None
        ]
        for pump in pumps:
            pump.start()
        code = self._wait(process, cancelled)
        exited.set()
        for pump in pumps:
            pump.join()
        for _, source in outputs:
            if source is not None:
                source.close()
        return code

    def _tty_process(self, size: tuple[int, int] | None, console_path: Path) -> list[str]:
        """`exec --process` with the container's own process spec, our command and the console size.

        The size must be on the console before the command starts (runc sets
        process.consoleSize when it makes the pty), or a quick `stty size`
        would read 0 0: runc copies our size over only after starting it.
        """
        state = subprocess.run(
            [self.runtime_path, "--root", self.runtime_root, "state", self.runtime_id],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if state.returncode != 0:
            raise FailedPrecondition(f"container {self.runtime_id}: {state.stderr.strip() or 'no runtime state'}")
        spec = json.loads((Path(json.loads(state.stdout)["bundle"]) / "config.json").read_text())
        process = dict(spec["process"], args=self.cmd, terminal=True)
        if size is not None:
            process["consoleSize"] = {"width": size[0], "height": size[1]}
        self.process_file.write_text(json.dumps(process))
        return [self.runtime_path, "--root", self.runtime_root, "exec", "--detach", "--console-socket", str(console_path),
                "--pid-file", str(self.pid_file), "--process", str(self.process_file), self.runtime_id]

    def _run_tty(self, streams: RemoteStreams, cancelled: threading.Event) -> int:
        first_size: list[tuple[int, int]] = []
        sized = threading.Event()
        master: list[int] = []
        sizes = streams.resizes()

        def apply_resizes() -> None:
            # TIOCSWINSZ on the console's master: the kernel signals the
            # container's foreground process group itself.
            for width, height in sizes:
                if not sized.is_set():
                    first_size.append((width, height))
                    sized.set()
                if master:
                    try:
                        set_window_size(master[0], width, height)
                    except OSError:
                        return

        threading.Thread(target=apply_resizes, daemon=True).start()
        if streams.resize is not None:
            sized.wait(FIRST_SIZE_WAIT_SECONDS)
        become_subreaper()
        console_path = self.pid_file.with_suffix(".console")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(console_path))
            listener.listen(1)
            argv = self._tty_process(first_size[0] if first_size else None, console_path)
            runtime = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
            if runtime.returncode != 0:
                raise FailedPrecondition(f"exec in container {self.runtime_id}: {runtime.stderr.strip() or 'the runtime failed'}")
            exec_pid = int(self.pid_file.read_text().strip())
            master.append(receive_console(listener))
        finally:
            listener.close()
            console_path.unlink(missing_ok=True)
        try:
            if first_size:  # a resize that came while the runtime started
                set_window_size(master[0], *first_size[-1])
            exited = threading.Event()
            if streams.stdin is not None:
                threading.Thread(target=_pump_from_stream, args=(streams.stdin, master[0], False), daemon=True).start()
            output = None
            if streams.stdout is not None:
                output = threading.Thread(target=_pump_to_stream, args=(master[0], streams.stdout, exited), daemon=True)
                output.start()
            code = self._wait_reparented(exec_pid, cancelled)
            exited.set()
            if output is not None:
                output.join()
        finally:
            os.close(master[0])
        return code

    def _wait_reparented(self, pid: int, cancelled: threading.Event) -> int:
        """The exit code of a detached exec, which became our child when the runtime exited."""
        while True:
            try:
                waited, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return 255  # not ours after all: somebody else reaped it
            if waited == pid:
                return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            if cancelled.wait(0.05):
                kill_process_tree(pid)
                cancelled = threading.Event()  # killed once; now just reap it


def become_subreaper() -> None:
    """Make this process the reaper of the detached execs it starts.

    A TTY exec runs detached with a console socket, the way conmon runs one:
    the console's master comes to us and the container's terminal keeps its
    own settings. (Attached, runc clears ONLCR on the container's console and
    leaves the translation to our side, which doubled every CR whenever the
    command read its terminal settings before runc cleared them.) Detached,
    the command is reparented when runc exits: to us, as subreaper.
    """
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def receive_console(listener: Any, timeout: float = 10.0) -> int:
    """The console master a detached `runc exec --console-socket` sends."""
    listener.settimeout(timeout)
    connection, _ = listener.accept()
    with connection:
        connection.settimeout(timeout)
        _, fds, _, _ = socket.recv_fds(connection, 4096, 1)
    if not fds:
        raise FailedPrecondition("the runtime sent no console for the exec")
    return fds[0]
