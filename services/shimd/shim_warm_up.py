"""The zygote's warm-up: whole shim lives run before it forks any shim."""

from __future__ import annotations

import _signal
import _socket
import os

from services.shimd import compact_json
from services.shimd.shim import Shim, supervise
from services.shimd.shim_log import MAX_LOG_LINE


# Requests a warm-up sends to its own shim, so the request paths are warm
# too; "stop" comes last and ends the stand-in container.
WARM_UP_REQUESTS = (
    {"op": "state"},
    {"op": "reopen_log"},
    {"op": "resize", "width": 80, "height": 24},
    {"op": "kill", "signal": 0},
    {"op": "warm-up"},
    {"op": "exec", "cmd": ["true"], "timeout": 10},
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
                if request["op"] == "exec":
                    request = dict(request, pid_file=os.path.join(base, "exec.pid"))
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
