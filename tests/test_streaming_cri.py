"""Exec, Attach and PortForward end to end: CRI calls on the gateway socket, real pods and
containers of the stack, and the URL they return driven by the independent test client."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_containers import Containers, wait_for_log
from tests.harness import wait_until
from tests.streaming_client import (
    PortForwardSession,
    UpgradeRefused,
    WebSocketClient,
    open_remote_command,
    spdy_exec,
)

# The client asserts on protocol violations in its read thread: make those fail the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")



COUNTER = ["sh", "-c", "i=0; while true; do echo count $i; i=$((i+1)); sleep 0.2; done"]


def processes_matching(containers: Containers, container_id: str, marker: str) -> list[str]:
    reply = containers.exec(container_id, "ps", "-o", "args")
    return [line for line in reply.stdout.decode().splitlines() if marker in line]


def exec_url(containers: Containers, container_id: str, cmd: list[str], tty: bool = False, stdin: bool = False) -> str:
    request = api_pb2.ExecRequest(container_id=container_id, cmd=cmd, tty=tty, stdin=stdin, stdout=True, stderr=not tty)
    return containers.runtime.Exec(request, timeout=20).url


def test_exec_echo_stdin_and_exit_code(containers: Containers) -> None:
    container_id = containers.run(command=["sleep", "3600"])
    url = exec_url(containers, container_id, ["echo", "hello from exec"])
    assert url.startswith("http://127.0.0.1:")
    result = spdy_exec(url)
    assert result.stdout == b"hello from exec\n" and result.exit_code == 0

    result = spdy_exec(exec_url(containers, container_id, ["sh", "-c", "cat; echo done >&2"], stdin=True), stdin=b"round\ntrip\n")
    assert (result.stdout, result.stderr, result.exit_code) == (b"round\ntrip\n", b"done\n", 0)

    result = spdy_exec(exec_url(containers, container_id, ["sh", "-c", "exit 3"]))
    assert result.status["reason"] == "NonZeroExitCode" and result.exit_code == 3


def test_exec_tty_resize_seen_by_stty(containers: Containers) -> None:
    container_id = containers.run(command=["sleep", "3600"])
    session = open_remote_command(exec_url(containers, container_id, ["sh"], tty=True, stdin=True), stdin=True, tty=True, stderr=False)
    session.send_resize(120, 40)
    assert session.stdin is not None
    session.stdin.write(b'stty size; echo E""ND\n')
    output = session.read_stdout_until(b"END\r\n")
    assert b"40 120" in output
    # Only the container's terminal shapes the output (ours is raw from the start).
    assert b"\r\r\n" not in output
    session.stdin.write(b"exit\n")
    assert session.finish().exit_code == 0


def test_exec_client_disconnect_kills_the_process(containers: Containers) -> None:
    container_id = containers.run(command=["sleep", "3600"])
    session = open_remote_command(exec_url(containers, container_id, ["sh", "-c", "echo up; sleep 5151"]))
    session.read_stdout_until(b"up")

    assert processes_matching(containers, container_id, "5151")
    session.client.close()
    wait_until(lambda: not processes_matching(containers, container_id, "5151"), 15, what="the exec'd process to be killed")


def test_exec_over_websocket(containers: Containers) -> None:
    container_id = containers.run(command=["sleep", "3600"])
    ws = WebSocketClient(exec_url(containers, container_id, ["sh", "-c", "cat; exit 4"], stdin=True), ["v5.channel.k8s.io"])
    ws.send(0, b"ws stdin\n")
    ws.send_stream_close(0)
    received = ws.collect()
    ws.close()
    assert received[1] == b"ws stdin\n"
    assert b'"message":"4"' in received[3]


def test_exec_url_is_single_use(containers: Containers) -> None:
    container_id = containers.run(command=["sleep", "3600"])
    url = exec_url(containers, container_id, ["true"])
    assert spdy_exec(url).exit_code == 0
    with pytest.raises(UpgradeRefused) as refused:
        spdy_exec(url)
    assert refused.value.status == 404


def test_exec_request_errors(containers: Containers) -> None:
    runtime = containers.runtime
    with pytest.raises(grpc.RpcError) as caught:
        runtime.Exec(api_pb2.ExecRequest(container_id="no-such-container", cmd=["true"], stdout=True), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        runtime.Exec(api_pb2.ExecRequest(container_id="x", cmd=["true"], tty=True, stderr=True), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tty and stderr" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        runtime.Exec(api_pb2.ExecRequest(container_id="x", cmd=["true"]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="no-such-pod", port=[80]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    exited = containers.run(command=["true"])
    containers.wait_exited(exited)
    with pytest.raises(grpc.RpcError) as caught:
        runtime.Exec(api_pb2.ExecRequest(container_id=exited, cmd=["true"], stdout=True), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_attach_to_a_counter(containers: Containers) -> None:
    container_id = containers.run(command=COUNTER)
    wait_for_log(containers, container_id, "count 2")
    url = containers.runtime.Attach(
        api_pb2.AttachRequest(container_id=container_id, stdout=True, stderr=True), timeout=20
    ).url
    session = open_remote_command(url, stdout=True, stderr=True)
    seen = session.read_stdout_until(b"\n", timeout=10)
    first = int(seen.split(b"count ")[1].split(b"\n")[0])
    assert first >= 2, "attach shows live output, not the log from the start"
    session.read_stdout_until(b"count %d\n" % (first + 3), timeout=10)
    session.client.close()
    # Output kept going to the CRI log while attached, and after.
    wait_for_log(containers, container_id, f"count {first + 6}")
    assert containers.status(container_id).status.state == api_pb2.CONTAINER_RUNNING


def test_attach_tty_with_stdin(containers: Containers) -> None:
    container_id = containers.run(command=["sh"], tty=True, stdin=True)
    containers.wait_state(container_id, api_pb2.CONTAINER_RUNNING)
    url = containers.runtime.Attach(
        api_pb2.AttachRequest(container_id=container_id, stdin=True, stdout=True, tty=True), timeout=20
    ).url
    session = open_remote_command(url, stdin=True, stdout=True, stderr=False, tty=True)
    assert session.stdin is not None
    session.send_resize(90, 25)
    time.sleep(0.3)
    session.stdin.write(b'stty size; echo AT""TACHED\n')
    assert b"25 90" in session.read_stdout_until(b"ATTACHED\r\n", timeout=15)
    session.stdin.write(b"exit 0\n")
    result = session.finish()
    assert result.exit_code == 0


def test_port_forward_nc_and_httpd_two_parallel_connections(containers: Containers) -> None:
    pod = containers.pod()
    containers.run(pod, name="httpd", command=["sh", "-c", "mkdir -p /www && echo served by httpd > /www/index.html && httpd -f -p 8080 -h /www"])
    containers.run(pod, name="nc", command=["sh", "-c", "nc -ll -p 9000 -e cat"])
    url = containers.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=pod[0], port=[8080, 9000]), timeout=20).url
    forward = PortForwardSession(url)
    try:
        wait_until(lambda: b" 200 " in forward.exchange(8080, b"GET / HTTP/1.0\r\n\r\n")[0], 20, what="httpd up")
        results: dict[str, tuple[bytes, bytes]] = {}

        def run(name: str, port: int, payload: bytes) -> None:
            results[name] = forward.exchange(port, payload)

        threads = [
            threading.Thread(target=run, args=("httpd", 8080, b"GET /index.html HTTP/1.0\r\n\r\n")),
            threading.Thread(target=run, args=("nc", 9000, b"echo me\n")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results["httpd"][0].endswith(b"served by httpd\n") and results["httpd"][1] == b""
        assert results["nc"] == (b"echo me\n", b"")
        reply, error = forward.exchange(9999, b"x")
        assert reply == b"" and b"refused" in error.lower()
    finally:
        forward.close()


# --- without images: a real pod from netd, a listener started in its network namespace ---


@pytest.fixture
def pod_with_listener(stack, pods):
    """A CRI pod and an echo server (busybox nc) inside its pinned network namespace."""
    from tests.fixtures_pods import sandbox_info

    sandbox_id = pods.run()
    netns = sandbox_info(stack, sandbox_id)["namespaces"]["network"]
    listener = subprocess.Popen(
        ["nsenter", f"--net={netns}", "/bin/busybox", "sh", "-c", "/bin/busybox nc -ll -p 9100 -e /bin/busybox cat"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield sandbox_id
    finally:
        os.killpg(listener.pid, signal.SIGKILL)
        listener.wait()


def test_port_forward_into_a_cri_pod(stack, pod_with_listener) -> None:
    url = stack.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=pod_with_listener, port=[9100]), timeout=20).url
    forward = PortForwardSession(url)
    try:
        wait_until(lambda: forward.exchange(9100, b"ping\n") == (b"ping\n", b""), 20, what="the pod's echo server")
        reply, error = forward.exchange(9199, b"x")
        assert reply == b"" and b"refused" in error.lower()
    finally:
        forward.close()
    with pytest.raises(UpgradeRefused) as refused:
        PortForwardSession(url)
    assert refused.value.status == 404


def test_streaming_request_errors_without_images(stack, pods) -> None:
    runtime = stack.runtime
    with pytest.raises(grpc.RpcError) as caught:
        runtime.Exec(api_pb2.ExecRequest(container_id="no-such-container", cmd=["true"], stdout=True), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        runtime.Attach(api_pb2.AttachRequest(container_id="no-such-container", stdout=True), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        runtime.Exec(api_pb2.ExecRequest(container_id="x", cmd=["true"], tty=True, stdout=True, stderr=True), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tty and stderr" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="no-such-pod", port=[80]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=""), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stopped = pods.run()
    pods.stop(stopped)
    with pytest.raises(grpc.RpcError) as caught:
        runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=stopped, port=[80]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_exec_sessions_do_not_outlive_a_killed_gateway(fresh_containers: Containers) -> None:
    containers = fresh_containers
    container_id = containers.run(command=["sleep", "3600"])
    session = open_remote_command(exec_url(containers, container_id, ["sh", "-c", "echo up; sleep 6161"]))
    session.read_stdout_until(b"up")

    assert processes_matching(containers, container_id, "6161")
    stack = containers.stack
    old_pid = stack.service_pid("crigw")
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: stack.wait_service_running("crigw") != old_pid, 30, what="crigw restarted")
    stack.wait_ready()
    wait_until(lambda: not processes_matching(containers, container_id, "6161"), 20, what="the dead gateway's exec to be killed")
    session.client.close()


def test_attach_stdin_once_closes_the_containers_stdin(containers: Containers) -> None:
    container_id = containers.run(command=["sh", "-c", "cat; echo stdin closed"], stdin=True, stdin_once=True)
    containers.wait_state(container_id, api_pb2.CONTAINER_RUNNING)
    url = containers.runtime.Attach(
        api_pb2.AttachRequest(container_id=container_id, stdin=True, stdout=True, stderr=True), timeout=20
    ).url
    session = open_remote_command(url, stdin=True, stdout=True, stderr=True)
    assert session.stdin is not None
    session.stdin.write(b"through attach\n")
    session.read_stdout_until(b"through attach\n")
    session.stdin.close()
    result = session.finish()
    assert result.stdout == b"through attach\nstdin closed\n"
    assert result.exit_code == 0
    containers.wait_exited(container_id)
    assert "stdout:through attach" in containers.log_contents(container_id)
