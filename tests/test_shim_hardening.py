"""Hostile exec requests and timeouts must neither kill a container's shim
nor end INTERNAL (issue 15 items 6 and 9), through the gateway socket and,
for what only the shim sees, through the shim's own control socket."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from common.exec_limits import MAX_EXEC_ARG_BYTES
from tests.fixtures_containers import CONTAINER_EXITED, CONTAINER_RUNNING, Containers


def rpc_code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.code(), caught.value.details()


def shim_pid(containers: Containers, container_id: str) -> int:
    return int(containers.info(container_id)["shim_pid"])


def control_socket(containers: Containers, container_id: str) -> str:
    return str(Path(containers.stack.run_dir) / "shims" / f"{container_id[:20]}.ctl")


def raw_request(path: str, payload: bytes, timeout: float = 20) -> bytes:
    """Send payload to the shim and read whatever it answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            # The shim closed with most of an oversized request unread: the
            # kernel then drops the connection, its answer with it.
            return b""
        return b"".join(chunks)


@pytest.fixture
def sleeper(containers: Containers) -> str:
    return containers.run(command=["sh", "-c", "trap 'exit 7' TERM; while true; do sleep 0.1; done"])


def assert_supervised(containers: Containers, container_id: str, pid_before: int) -> None:
    """The same shim still supervises the container and answers."""
    assert shim_pid(containers, container_id) == pid_before
    os.kill(pid_before, 0)
    assert containers.status(container_id).status.state == CONTAINER_RUNNING
    reply = containers.exec(container_id, "echo", "still here")
    assert reply.stdout == b"still here\n" and reply.exit_code == 0


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["sh", "-c", "echo ok", "x" * (3 << 20)], id="3MiB-argument"),
        pytest.param(["echo", "x" * (MAX_EXEC_ARG_BYTES + 1)], id="argument-over-MAX_ARG_STRLEN"),
        pytest.param(["echo"] + ["y" * 100_000] * 12, id="argv-over-1MiB"),
        pytest.param(["echo"] + ["z"] * 20_000, id="too-many-arguments"),
        pytest.param(["echo", "a\0b"], id="NUL-in-argument"),
    ],
)
def test_oversized_exec_is_invalid_argument_and_the_shim_lives(containers: Containers, sleeper: str, command: list[str]) -> None:
    before = shim_pid(containers, sleeper)
    for call in (
        lambda: containers.exec(sleeper, *command),
        lambda: containers.runtime.Exec(api_pb2.ExecRequest(container_id=sleeper, cmd=command, stdout=True), timeout=30),
    ):
        code, message = rpc_code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert "argument" in message and len(message) < 1000
    assert_supervised(containers, sleeper, before)


def test_exec_within_the_limits_still_runs(containers: Containers, sleeper: str) -> None:
    argument = "w" * (MAX_EXEC_ARG_BYTES - 1)
    reply = containers.exec(sleeper, "sh", "-c", 'printf "%s" "$1" | wc -c', "sh", argument)
    assert reply.stdout.strip() == str(len(argument)).encode()
    unicode = "é" * 1000
    assert containers.exec(sleeper, "echo", unicode).stdout == (unicode + "\n").encode()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"x" * (9 << 20), id="9MiB-no-newline"),
        pytest.param(b'{"op": "exec", "cmd": ["echo", "' + b"x" * (3 << 20) + b'"], "pid_file": "/nonexistent/p"}\n', id="3MiB-exec"),
        pytest.param(b"[" * 200_000 + b"\n", id="deep-nesting"),
        pytest.param(b"\xff\xfe\n", id="not-utf8"),
        pytest.param(b"[1, 2]\n", id="not-an-object"),
        pytest.param(b'{"op": "stop", "timeout": "soon"}\n', id="bad-field"),
        pytest.param(b'{"op": "exec", "cmd": ["echo"], "timeout": 1e400, "pid_file": "/nonexistent/p"}\n', id="infinite-timeout"),
        pytest.param(b"", id="nothing"),
    ],
)
def test_shim_answers_any_control_request_and_lives(containers: Containers, sleeper: str, payload: bytes) -> None:
    """shimd never sends these; whatever reaches the shim's socket, the shim goes on."""
    before = shim_pid(containers, sleeper)
    answer = raw_request(control_socket(containers, sleeper), payload)
    if answer:
        assert json.loads(answer)["ok"] is False
    assert_supervised(containers, sleeper, before)


def test_huge_timeouts_are_clamped(containers: Containers, sleeper: str) -> None:
    huge = (1 << 63) - 1
    reply = containers.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=sleeper, cmd=["echo", "hi"], timeout=huge), timeout=60)
    assert reply.stdout == b"hi\n"
    code, message = rpc_code(containers.runtime.ExecSync, api_pb2.ExecSyncRequest(container_id=sleeper, cmd=["true"], timeout=-1), timeout=60)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    # The grace period is clamped to a week: the trap ends the container at once.
    containers.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=sleeper, timeout=huge), timeout=60)
    status = containers.wait_state(sleeper, CONTAINER_EXITED)
    assert status.exit_code == 7


def test_a_shorter_stop_cuts_a_long_grace_period_short(containers: Containers) -> None:
    """A stop waiting out a long grace period does not hold the container:
    a later stop with timeout 0 (or RemoveContainer) kills it at once, and
    both calls return."""
    import threading
    import time

    stubborn = containers.run(command=["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    first: dict[str, object] = {}

    def long_stop() -> None:
        try:
            containers.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=stubborn, timeout=3600), timeout=120)
            first["ok"] = True
        except grpc.RpcError as exc:
            first["error"] = exc.code()

    waiter = threading.Thread(target=long_stop)
    waiter.start()
    time.sleep(1.0)  # the first stop is now waiting out its hour
    containers.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=stubborn, timeout=0), timeout=60)
    status = containers.wait_state(stubborn, CONTAINER_EXITED)
    assert status.exit_code == 137
    waiter.join(60)
    assert not waiter.is_alive() and first == {"ok": True}, first
    containers.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=stubborn), timeout=60)


def test_a_slow_exec_does_not_hold_up_the_shim(containers: Containers, sleeper: str) -> None:
    """The shim serves an exec's pipes from its poll loop: while one exec
    runs, others, status and the container's own supervision go on."""
    import threading

    slow: dict[str, object] = {}

    def slow_exec() -> None:
        slow["reply"] = containers.exec(sleeper, "sh", "-c", "sleep 3; echo slow; echo late >&2; exit 3", timeout=30)

    runner = threading.Thread(target=slow_exec)
    runner.start()
    try:
        for index in range(3):
            reply = containers.exec(sleeper, "sh", "-c", f"echo fast-{index}")
            assert (reply.stdout, reply.exit_code) == (f"fast-{index}\n".encode(), 0)
        assert runner.is_alive(), "the fast execs waited for the slow one"
    finally:
        runner.join(60)
    reply = slow["reply"]
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"slow\n", b"late\n", 3)


def test_an_exec_outliving_its_container_is_ended_and_answered(containers: Containers) -> None:
    """In a pod-wide PID namespace an exec'd process survives its container's
    init: the shim kills it and answers instead of waiting for it (here,
    with no exec timeout, that would be forever)."""
    import threading

    pod = containers.pod(pid_mode=api_pb2.POD)
    pod_ns = api_pb2.LinuxContainerConfig()
    pod_ns.security_context.namespace_options.pid = api_pb2.POD
    container_id = containers.run(pod, "short-lived", command=["sleep", "300"], linux=pod_ns)
    outcome: dict[str, object] = {}

    def endless_exec() -> None:
        try:
            outcome["reply"] = containers.runtime.ExecSync(
                api_pb2.ExecSyncRequest(container_id=container_id, cmd=["sleep", "2911"], timeout=0), timeout=120)
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()

    runner = threading.Thread(target=endless_exec)
    runner.start()
    try:
        assert wait_for_process(containers, container_id, b"sleep\x002911")
        containers.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=container_id, timeout=0), timeout=60)
        containers.wait_state(container_id, CONTAINER_EXITED)
    finally:
        runner.join(90)
    assert not runner.is_alive()
    # Killed with the container (137), or answered as not running.
    assert outcome.get("code") == grpc.StatusCode.FAILED_PRECONDITION or outcome["reply"].exit_code == 137, outcome
    assert not any(cmdline_of(pid) == b"sleep\x002911\x00" for pid in os.listdir("/proc") if pid.isdigit())


def cmdline_of(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_for_process(containers: Containers, container_id: str, cmdline: bytes) -> bool:
    """A process with this command line runs on the node."""
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(cmdline_of(pid).startswith(cmdline) for pid in os.listdir("/proc") if pid.isdigit()):
            return True
        time.sleep(0.1)
    return False
