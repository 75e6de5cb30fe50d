"""Restarts with a container running (issue 6): `supervisorctl restart` of each
service, of all of them, and of supervisord itself; and a shim that dies on
its own. The container keeps running with the same PID, its log has no lost
or duplicated line, and its status stays right.
"""

from __future__ import annotations

import os
import signal
import signal as signals
import threading
import time
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2

from tests.fixtures_containers import CONTAINER_EXITED, CONTAINER_RUNNING, Containers, wait_for_log
from tests.fixtures_faults import (
    TICKER,
    Patient,
    assert_no_leaks,
    assert_ticks_contiguous,
    log_file_of,
    ticks_in,
    wait_all_running,
)
from tests.harness import SERVICES, Stack, wait_until


def assert_still_running(patient: Patient, containers: Containers, container_id: str, pid: int, shim_pid: int) -> None:
    status = patient.status(container_id)
    assert status.state == CONTAINER_RUNNING
    info = patient.info(container_id)
    assert (info["pid"], info["shim_pid"]) == (pid, shim_pid)
    os.kill(pid, 0)
    # The log keeps growing, with every line once.
    before = len(ticks_in(log_file_of(containers).read_text()))
    wait_until(lambda: len(ticks_in(log_file_of(containers).read_text())) > before + 3, 10, what="more ticks")
    assert_ticks_contiguous(log_file_of(containers).read_text())
    assert patient.exec(container_id, "echo", "alive").stdout == b"alive\n"


def plant_interrupted_writes(stack: Stack, service: str, sandbox_id: str) -> list[Path]:
    """The temp files an atomic write leaves when its writer is SIGKILLed
    before the rename, in the directories the service writes."""
    directories = [stack.state_dir / service]
    if service == "shimd":
        directories.append(stack.state_dir / "shimd" / "closing")
    planted = []
    for directory in directories:
        if directory.is_dir():
            path = directory / f".{sandbox_id}.k1ll3d.tmp"
            path.write_bytes(b"")
            planted.append(path)
    assert planted
    return planted


def restart_supervisord(stack: Stack) -> None:
    """Stop supervisord (and with it every service), then start it again."""
    assert stack.supervisord is not None
    stack.supervisord.send_signal(signal.SIGTERM)
    stack.supervisord.wait(60)
    stack.start()


def test_restart_each_service_all_and_supervisord_keeps_the_container(
    fault_containers: Containers, patient: Patient
) -> None:
    containers = fault_containers
    stack = containers.stack
    container_id = containers.run(command=TICKER)
    wait_for_log(containers, container_id, "tick3")
    info = patient.info(container_id)
    pid, shim_pid = info["pid"], info["shim_pid"]
    started_at = patient.status(container_id).started_at

    for service in SERVICES:
        old = stack.service_pid(service)
        interrupted = plant_interrupted_writes(stack, service, container_id)
        stack.supervisorctl("restart", service)
        assert stack.service_pid(service) not in (0, old)
        # What a kill cut short mid-write is swept at start, not mistaken
        # for state (a pod id in shimd's closing/, say).
        assert [path for path in interrupted if path.exists()] == []
        assert_still_running(patient, containers, container_id, pid, shim_pid)

    old_pids = {service: stack.service_pid(service) for service in SERVICES}
    stack.supervisorctl("restart", "all")
    wait_all_running(stack)
    assert all(stack.service_pid(service) != old_pids[service] for service in SERVICES)
    assert_still_running(patient, containers, container_id, pid, shim_pid)

    restart_supervisord(stack)
    wait_all_running(stack)
    assert_still_running(patient, containers, container_id, pid, shim_pid)
    assert patient.status(container_id).started_at == started_at

    # The container ends: its exit is reported with its own code, the log is whole.
    rootfs = Path(info["runtime_spec"]["root"]["path"])
    (rootfs / "tmp" / "finish").write_text("")
    status = containers.wait_exited(container_id)
    assert status.exit_code == 42 and status.reason == "Error"
    text = log_file_of(containers).read_text()
    assert_ticks_contiguous(text, at_least=20)
    assert text.rstrip("\n").endswith("stdout F bye")
    containers.cleanup()
    assert_no_leaks(stack)


def test_shim_killed_on_its_own_never_leaves_the_container_running_forever(
    fault_containers: Containers, patient: Patient
) -> None:
    containers = fault_containers
    pod = containers.pod()
    # One container ends on its own after its shim died, one is stopped.
    ending = containers.run(pod, name="ending", command=["sh", "-c", "while [ ! -e /tmp/finish ]; do usleep 50000; done; exit 3"])
    chatty = containers.run(pod, name="main", command=TICKER)
    wait_for_log(containers, chatty, "tick3")
    ending_info, chatty_info = patient.info(ending), patient.info(chatty)
    for info in (ending_info, chatty_info):
        os.kill(info["shim_pid"], signals.SIGKILL)
    wait_until(lambda: not _alive(ending_info["shim_pid"]) and not _alive(chatty_info["shim_pid"]), 10, what="shims gone")

    # Both inits live on without their shim (their keepers hold them, and a
    # new shim takes them over: test_shim_adoption.py): RUNNING is the truth.
    assert patient.status(ending).state == CONTAINER_RUNNING
    assert patient.status(chatty).state == CONTAINER_RUNNING

    # The container's init exits after its shim died: its keeper reaped it,
    # so its own exit code is reported.
    Path(ending_info["runtime_spec"]["root"]["path"], "tmp", "finish").write_text("")
    status = containers.wait_exited(ending, timeout=20)
    assert (status.exit_code, status.reason) == (3, "Error") and status.finished_at >= status.started_at
    assert not _alive(ending_info["pid"])

    # StopContainer still ends a container whose shim is gone.
    patient.stop(chatty, timeout=1)
    status = patient.status(chatty)
    assert status.state == CONTAINER_EXITED and status.reason
    wait_until(lambda: not _alive(chatty_info["pid"]), 10, what="the container's init gone")
    assert_ticks_contiguous(log_file_of(containers).read_text())

    # Remove cleans up both, with no runc container, mount or process left.
    patient.remove(ending)
    patient.remove(chatty)
    containers.cleanup()
    assert_no_leaks(containers.stack)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_restart_does_not_wait_for_calls_in_flight(fault_containers: Containers, patient: Patient) -> None:
    """A restart during a long ExecSync: the call ends at once with
    UNAVAILABLE (the kubelet retries), the daemon exits on SIGTERM by itself
    rather than being SIGKILLed after stopwaitsecs, and the container runs on."""
    containers = fault_containers
    stack = containers.stack
    container_id = containers.run(command=["sleep", "3600"])
    pid = patient.info(container_id)["pid"]
    for service in ("shimd", "crigw"):
        outcome: dict[str, object] = {}

        def long_exec() -> None:
            request = api_pb2.ExecSyncRequest(container_id=container_id, cmd=["sleep", "30"], timeout=40)
            started = time.monotonic()
            try:
                patient.once("ExecSync", request, 60)
                outcome["code"] = "OK"
            except grpc.RpcError as exc:
                outcome["code"] = exc.code().name
            outcome["elapsed"] = time.monotonic() - started

        caller = threading.Thread(target=long_exec)
        caller.start()
        time.sleep(1)
        stack.supervisorctl("restart", service)
        caller.join(40)
        assert outcome["code"] == "UNAVAILABLE" and outcome["elapsed"] < 20, outcome
        log = (stack.supervisor_dir / "supervisord.log").read_text()
        stops = [line for line in log.splitlines() if f"stopped: {service} " in line]
        assert stops and "exit status 0" in stops[-1], stops
        wait_all_running(stack)
        assert patient.status(container_id).state == CONTAINER_RUNNING
        assert patient.info(container_id)["pid"] == pid
    containers.cleanup()
    assert_no_leaks(stack)
