"""A container whose shim is SIGKILLed keeps running and gets a new shim
(services/shimd/adoption.py, keeper.py): same PID, its log goes on, exec,
ReopenContainerLog and stop work, and its exit code is right, also across a
shimd restart (issue 15 item 6); a tty container keeps its terminal."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

from cri_api.v1 import api_pb2

from tests.fixtures_containers import CONTAINER_EXITED, CONTAINER_RUNNING, Containers
from tests.harness import wait_until
from tests.streaming_client import open_remote_command

COUNTER = "i=0; trap 'exit 3' TERM; while true; do echo line-$i; i=$((i+1)); sleep 0.05; done"


def numbers(text: str) -> list[int]:
    return [int(found) for found in re.findall(r" F line-(\d+)$", text, re.MULTILINE)]


def new_shim(containers: Containers, container_id: str, old_shim: int) -> dict:
    return wait_until(
        lambda: (info := containers.info(container_id))["shim_pid"] not in (0, old_shim) and info,
        30, what="a new shim for the container",
    )


def kill_shim(containers: Containers, container_id: str, stop_shimd: bool = False) -> tuple[dict, int]:
    """SIGKILL the container's shim (after stopping shimd if told); (info before, last log number then)."""
    info = containers.info(container_id)
    log_path = Path(containers.status(container_id).status.log_path)
    if stop_shimd:
        containers.stack.supervisorctl("stop", "shimd")
    os.kill(info["shim_pid"], signal.SIGKILL)
    seen = numbers(log_path.read_text())
    return info, max(seen) if seen else -1


def assert_log_goes_on(containers: Containers, container_id: str, after: int) -> None:
    """Lines written after the kill reach the log, none missing past the kill's moment
    (the dead shim may have held one read it had not written yet)."""
    wait_until(lambda: max(numbers(containers.log_text(container_id)), default=-1) > after + 40, 30,
               what="log lines after the re-adoption")
    logged = set(numbers(containers.log_text(container_id)))
    expected = set(range(after + 10, max(logged) + 1))
    assert expected <= logged, sorted(expected - logged)[:10]


def test_a_container_outlives_its_shim_and_is_readopted(fresh_containers: Containers) -> None:
    containers = fresh_containers
    pod = containers.pod()
    counter = containers.run(pod, "counter", command=["sh", "-c", COUNTER])
    wait_until(lambda: numbers(containers.log_text(counter)), 20, what="the first log lines")
    before, last = kill_shim(containers, counter)
    after = new_shim(containers, counter, before["shim_pid"])
    assert after["pid"] == before["pid"] and after["keeper_pid"] == before["keeper_pid"]
    assert containers.status(counter).status.state == CONTAINER_RUNNING
    assert_log_goes_on(containers, counter, last)
    assert containers.exec(counter, "echo", "exec-ok").stdout == b"exec-ok\n"
    # Attach: the new shim serves the container's attach socket (stream id, then data).
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
        client.settimeout(10)
        client.connect(str(Path(containers.stack.run_dir) / "shims" / f"{counter[:20]}.attach"))
        packet = client.recv(65536)
        assert packet[:1] == b"\x02" and b"line-" in packet[1:]

    # ReopenContainerLog through the new shim: new lines go to a new file.
    log_path = Path(containers.status(counter).status.log_path)
    log_path.rename(log_path.with_suffix(".old"))
    containers.runtime.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=counter), timeout=20)
    wait_until(lambda: log_path.exists() and numbers(log_path.read_text()), 20, what="lines in the reopened log")

    # The shim dies while shimd is down: shimd's start takes the container over.
    before, last = kill_shim(containers, counter, stop_shimd=True)
    containers.stack.supervisorctl("start", "shimd")
    containers.stack.wait_ready()
    after = new_shim(containers, counter, before["shim_pid"])
    assert after["pid"] == before["pid"]
    assert_log_goes_on(containers, counter, last)

    # Stop through the new shim: the trap's exit code, not a lost one.
    containers.stop(counter, timeout=10)
    status = containers.wait_state(counter, CONTAINER_EXITED)
    assert status.exit_code == 3, status.message


def test_exit_code_of_a_container_that_ends_after_losing_its_shim(fresh_containers: Containers) -> None:
    containers = fresh_containers
    pod = containers.pod()
    # One ends right away after its shim is gone (before or after a new shim
    # is up); the keeper's record gives its code either way.
    quick = containers.run(pod, "quick", command=["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 5"])
    info = containers.info(quick)
    os.kill(info["shim_pid"], signal.SIGKILL)
    # The exec goes through the new shim once it is there.
    new_shim(containers, quick, info["shim_pid"])
    containers.exec(quick, "touch", "/tmp/go")
    status = containers.wait_state(quick, CONTAINER_EXITED)
    assert status.exit_code == 5, status.message
    # One ends while shimd is down and no shim watches it.
    late = containers.run(pod, "late", command=["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 6"])
    info = containers.info(late)
    containers.stack.supervisorctl("stop", "shimd")
    os.kill(info["shim_pid"], signal.SIGKILL)
    time.sleep(0.5)
    # The container's own file system: touch it from the node through /proc.
    Path(f"/proc/{info['pid']}/root/tmp/go").touch()
    wait_until(lambda: not Path(f"/proc/{info['pid']}").exists() or
               Path(f"/proc/{info['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 20, what="the container's exit")
    containers.stack.supervisorctl("start", "shimd")
    containers.stack.wait_ready()
    status = containers.wait_state(late, CONTAINER_EXITED)
    assert status.exit_code == 6, status.message


def test_a_container_nobody_supervises_is_unknown_not_running(fresh_containers: Containers) -> None:
    containers = fresh_containers
    lost = containers.run(containers.pod(), "lost", command=["sleep", "3600"])
    info = containers.info(lost)
    containers.stack.supervisorctl("stop", "shimd")  # no new shim may come
    os.kill(info["keeper_pid"], signal.SIGKILL)
    os.kill(info["shim_pid"], signal.SIGKILL)
    containers.stack.supervisorctl("start", "shimd")
    containers.stack.wait_ready()
    assert containers.status(lost).status.state == api_pb2.CONTAINER_UNKNOWN
    # StopContainer still ends it; its code is lost and the message says so.
    containers.stop(lost, timeout=1)
    status = containers.wait_state(lost, CONTAINER_EXITED)
    assert status.exit_code == 255 and "exit" in status.message


def attach_and_ask_size(containers: Containers, container_id: str, columns: int, rows: int) -> bytes:
    """Attach to a tty container's shell, resize its terminal and read back `stty size`."""
    url = containers.runtime.Attach(
        api_pb2.AttachRequest(container_id=container_id, stdin=True, stdout=True, tty=True), timeout=20
    ).url
    session = open_remote_command(url, stdin=True, stdout=True, stderr=False, tty=True)
    try:
        assert session.stdin is not None
        session.send_resize(columns, rows)
        time.sleep(0.3)
        session.stdin.write(b'stty size; echo AT""TACHED\n')
        return session.read_stdout_until(b"ATTACHED\r\n", timeout=15)
    finally:
        session.client.close()


def test_a_tty_container_is_readopted_with_its_terminal(containers: Containers) -> None:
    """The pty master outlives the shim (queued with the keeper): a new shim
    serves the same terminal, its input, output and size, twice over."""
    shell = containers.run(command=["sh"], tty=True, stdin=True)
    containers.wait_state(shell, CONTAINER_RUNNING)
    assert b"24 80" in attach_and_ask_size(containers, shell, 80, 24)
    for columns, rows in ((90, 25), (100, 30)):
        before = containers.info(shell)
        os.kill(before["shim_pid"], signal.SIGKILL)
        after = new_shim(containers, shell, before["shim_pid"])
        assert after["pid"] == before["pid"]
        assert containers.status(shell).status.state == CONTAINER_RUNNING
        assert b"%d %d" % (rows, columns) in attach_and_ask_size(containers, shell, columns, rows)
    # What the terminal showed after the re-adoptions reached the CRI log too.
    wait_until(lambda: containers.log_text(shell).count("30 100") >= 1, 20, what="the shell's output in the log")
    containers.stop(shell, timeout=5)
    containers.wait_state(shell, CONTAINER_EXITED)
