"""Containers outlive their services: kill -9 of shimd and crigw on a private stack.

The shim is in a session of its own and keeps the container, its log and
its exit file; a restarted shimd finds it again, and an exit that happened
while shimd was down is reported from the exit file with the right code.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.fixtures_containers import CONTAINER_RUNNING, Containers, wait_for_log
from tests.harness import wait_until


def kill_service(containers: Containers, service: str) -> int:
    pid = containers.stack.service_pid(service)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_container_survives_kill_of_shimd_and_crigw(fresh_containers: Containers) -> None:
    containers = fresh_containers
    stack = containers.stack
    container_id = containers.run(
        command=["sh", "-c", "i=0; while [ ! -e /tmp/finish ]; do echo tick$i; i=$((i+1)); sleep 0.1; done; echo bye; exit 42"]
    )
    wait_for_log(containers, container_id, "tick3")
    info = containers.info(container_id)
    container_pid, shim_pid = info["pid"], info["shim_pid"]
    rootfs = Path(info["runtime_spec"]["root"]["path"])

    old_shimd, old_crigw = kill_service(containers, "shimd"), kill_service(containers, "crigw")
    ticks_at_kill = log_ticks(containers)
    wait_until(lambda: stack.service_pid("shimd") not in (0, old_shimd) and stack.service_pid("crigw") not in (0, old_crigw),
               30, what="shimd and crigw restarted")
    stack.wait_ready()
    os.kill(container_pid, 0)  # the container's init is alive
    os.kill(shim_pid, 0)
    status = containers.status(container_id).status
    assert status.state == CONTAINER_RUNNING
    assert containers.info(container_id)["pid"] == container_pid
    wait_until(lambda: log_ticks(containers) > ticks_at_kill + 5, 10, what="more ticks")
    # The restarted shimd talks to the same shim: exec goes through it.
    assert containers.exec(container_id, "echo", "still-here").stdout == b"still-here\n"

    # Now the container exits while shimd is down.
    old_shimd = kill_service(containers, "shimd")
    (rootfs / "tmp" / "finish").write_text("")
    wait_until(lambda: not Path(f"/proc/{shim_pid}/cmdline").exists() or not Path(f"/proc/{shim_pid}/cmdline").read_bytes(),
               10, what="the shim to finish")
    wait_until(lambda: stack.service_pid("shimd") not in (0, old_shimd), 30, what="shimd restarted")
    stack.wait_ready()
    status = containers.wait_exited(container_id, timeout=20)
    assert status.exit_code == 42 and status.reason == "Error"
    assert status.finished_at > status.started_at
    lines = containers.log_contents(container_id)
    assert lines[-1] == "stdout:bye"
    ticks = [int(line.split("tick")[1]) for line in lines if "tick" in line]
    assert ticks == list(range(len(ticks)))  # the log never skipped a line during the outages
    containers.remove(container_id)


def log_ticks(containers: Containers) -> int:
    """How many tick lines the log holds (read from the file: crigw may be down)."""
    files = list(containers.log_root.rglob("main.log"))
    assert files, "no log file"
    return files[0].read_text().count("tick")


def test_container_survives_restart_of_supervisord(fresh_containers: Containers) -> None:
    containers = fresh_containers
    stack = containers.stack
    container_id = containers.run(command=["sh", "-c", "while true; do echo tick; sleep 0.2; done"])
    wait_for_log(containers, container_id, "tick")
    info = containers.info(container_id)
    assert stack.supervisord is not None
    # Stopping supervisord stops every service (SIGTERM to each daemon's pid only).
    stack.supervisord.send_signal(signal.SIGTERM)
    stack.supervisord.wait(60)
    os.kill(info["pid"], 0)
    os.kill(info["shim_pid"], 0)
    stack.start()
    status = containers.status(container_id).status
    assert status.state == CONTAINER_RUNNING and containers.info(container_id)["pid"] == info["pid"]
    assert containers.exec(container_id, "echo", "after-restart").stdout == b"after-restart\n"
    containers.stop(container_id, 0)
    assert containers.status(container_id).status.exit_code == 137
