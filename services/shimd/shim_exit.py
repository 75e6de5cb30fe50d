"""The shim's exit handling: reaping the init (or learning a re-adopted one's
exit from its keeper), the exit file, stop deadlines, and closing down.
"""

from __future__ import annotations

import _signal
import _socket
import os
import time

from services.shimd import compact_json
from services.shimd.shim_io import atomic_write, keeper_exit_status


# Extra time a stop waits for the exit after SIGKILL before it answers.
KILL_GRACE_SECONDS = 10.0
# How long a re-adopted init's exit may wait for the keeper's record of it.
KEEPER_RECORD_WAIT_SECONDS = 5.0


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


class ShimExit:
    """Exit handling, part of the Shim (shim.py)."""

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
            else:
                self.exec_exited(pid, status)

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
