"""The streaming server against a real runc container and network namespace of the test's own.

These drive the real protocol code, the real `runc exec` backend and the
real netns port-forward dialer through an independent client
(tests/streaming_client.py); tests/test_streaming_cri.py does the same
through the CRI gateway with pods and containers of the stack.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.fixtures_streaming import LocalStreaming, start_local_streaming
from tests.harness import wait_until
from tests.streaming_client import (
    PortForwardSession,
    SpdyClient,
    UpgradeRefused,
    WebSocketClient,
    http_get,
    open_remote_command,
    spdy_exec,
)

# The client asserts on protocol violations in its read thread: make those fail the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def test_exec_echo(local_streaming: LocalStreaming) -> None:
    result = spdy_exec(local_streaming.exec_url(["echo", "hello", "world"]))
    assert result.protocol == "v4.channel.k8s.io"
    assert result.stdout == b"hello world\n"
    assert result.stderr == b""
    assert result.status == {"metadata": {}, "status": "Success"}


def test_exec_stdin_round_trip(local_streaming: LocalStreaming) -> None:
    payload = b"".join(b"line %d\n" % n for n in range(5000))
    result = spdy_exec(local_streaming.exec_url(["cat"], stdin=True), stdin=payload)
    assert result.stdout == payload
    assert result.exit_code == 0


def test_exec_stdout_and_stderr_kept_apart(local_streaming: LocalStreaming) -> None:
    result = spdy_exec(local_streaming.exec_url(["sh", "-c", "echo out; echo err >&2"]))
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")


def test_exec_exit_code_through_error_stream(local_streaming: LocalStreaming) -> None:
    result = spdy_exec(local_streaming.exec_url(["sh", "-c", "echo before; exit 3"]))
    assert result.stdout == b"before\n"
    status = result.status
    assert status["status"] == "Failure"
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    assert result.exit_code == 3


def test_exec_old_protocol_gets_plain_error_text(local_streaming: LocalStreaming) -> None:
    ok = spdy_exec(local_streaming.exec_url(["true"]), protocols=["v2.channel.k8s.io"])
    assert ok.protocol == "v2.channel.k8s.io" and ok.error == b""
    failed = spdy_exec(local_streaming.exec_url(["sh", "-c", "exit 3"]), protocols=["channel.k8s.io"])
    assert failed.protocol == "channel.k8s.io"
    assert b"non-zero exit code" in failed.error and b"3" in failed.error


def test_exec_tty_and_resize_visible_to_stty(local_streaming: LocalStreaming) -> None:
    session = open_remote_command(local_streaming.exec_url(["sh"], stdin=True, tty=True), stdin=True, tty=True, stderr=False)
    assert session.resize is not None and session.stdin is not None
    session.send_resize(100, 30)
    session.stdin.write(b'stty size; echo E""ND1\n')
    assert b"30 100" in session.read_stdout_until(b"END1\r\n")
    session.send_resize(132, 43)
    time.sleep(0.2)
    session.stdin.write(b'stty size; echo E""ND2\n')
    assert b"43 132" in session.read_stdout_until(b"END2\r\n")
    session.stdin.write(b"exit 7\n")
    result = session.finish()
    assert result.exit_code == 7


def test_exec_client_disconnect_leaves_no_process(local_streaming: LocalStreaming) -> None:
    marker = "4242"
    session = open_remote_command(local_streaming.exec_url(["sh", "-c", f"echo started; sleep {marker}1 & sleep {marker}2"]))
    session.read_stdout_until(b"started")
    assert wait_until(lambda: sum(marker in line for line in local_streaming.target.processes()) >= 2, 10)
    session.client.close()  # no GOAWAY etiquette: the client just vanishes
    wait_until(
        lambda: not any(marker in line for line in local_streaming.target.processes()),
        15,
        what="the exec'd processes to be killed",
    )


def test_exec_over_websocket_v4_and_v5(local_streaming: LocalStreaming) -> None:
    ws = WebSocketClient(local_streaming.exec_url(["sh", "-c", "cat; exit 3"], stdin=True), ["v5.channel.k8s.io", "v4.channel.k8s.io"])
    assert ws.protocol == "v5.channel.k8s.io"
    ws.send(0, b"via websocket\n")
    ws.send_stream_close(0)  # v5: stdin EOF
    received = ws.collect()
    ws.close()
    assert received[1] == b"via websocket\n"
    status = json.loads(received[3])
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]

    ws = WebSocketClient(local_streaming.exec_url(["echo", "v4"]), ["v4.base64.channel.k8s.io"])
    assert ws.protocol == "v4.base64.channel.k8s.io"
    received = ws.collect()
    ws.close()
    assert received[1] == b"v4\n" and json.loads(received[3])["status"] == "Success"


def test_websocket_answers_pings(local_streaming: LocalStreaming) -> None:
    ws = WebSocketClient(local_streaming.exec_url(["sleep", "1"]), ["v4.channel.k8s.io"])
    ws.ping(b"are you there")
    frames = []
    while (frame := ws.recv_frame()) is not None and frame[0] != 0xA:
        frames.append(frame)
    assert frame == (0xA, b"are you there")
    ws.close()


def test_token_is_single_use_and_bound_to_its_kind(local_streaming: LocalStreaming) -> None:
    url = local_streaming.exec_url(["true"])
    assert spdy_exec(url).exit_code == 0
    with pytest.raises(UpgradeRefused) as refused:
        spdy_exec(url)
    assert refused.value.status == 404
    attach_path = local_streaming.exec_url(["true"]).replace("/exec/", "/attach/")
    assert http_get(attach_path)[0] == 404
    assert http_get(f"{local_streaming.server.base_url}/exec/not-a-token")[0] == 404
    assert http_get(f"{local_streaming.server.base_url}/")[0] == 404


def test_token_expires(streaming_target) -> None:
    streaming = start_local_streaming(streaming_target, token_ttl=0.3)
    try:
        url = streaming.exec_url(["true"])
        time.sleep(0.6)
        assert http_get(url, {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"})[0] == 404
    finally:
        streaming.server.stop()


def test_protocol_negotiation_refusals(local_streaming: LocalStreaming) -> None:
    with pytest.raises(UpgradeRefused) as refused:
        SpdyClient(local_streaming.exec_url(["true"]), ["v9.channel.k8s.io"])
    assert refused.value.status == 403
    assert "v4.channel.k8s.io" in refused.value.headers["x-accepted-stream-protocol-versions"]
    with pytest.raises(UpgradeRefused) as refused:
        SpdyClient(local_streaming.exec_url(["true"]), [])
    assert refused.value.status == 400
    status, body = http_get(local_streaming.exec_url(["true"]))
    assert status == 400 and b"missing upgrade headers" in body


def test_concurrent_stream_limit(streaming_target) -> None:
    streaming = start_local_streaming(streaming_target, max_concurrent_streams=1)
    try:
        first = open_remote_command(streaming.exec_url(["sleep", "30"]))
        with pytest.raises(UpgradeRefused) as refused:
            open_remote_command(streaming.exec_url(["true"]))
        assert refused.value.status == 429
        first.client.close()
        wait_until(lambda: spdy_exec(streaming.exec_url(["true"])).exit_code == 0, 10, what="a free slot")
    finally:
        streaming.server.stop()


def test_idle_stream_is_closed(streaming_target) -> None:
    streaming = start_local_streaming(streaming_target, stream_idle_timeout=1.0)
    try:
        session = open_remote_command(streaming.exec_url(["sh", "-c", "sleep 4343"]))
        assert session.client.closed.wait(10), "an idle session must be closed"
        wait_until(lambda: not any("4343" in line for line in streaming_target.processes()), 15)
    finally:
        streaming.server.stop()


# --- port-forward ------------------------------------------------------------------


def test_port_forward_to_nc_with_two_parallel_connections(local_streaming: LocalStreaming) -> None:
    target = local_streaming.target
    # One listener echoes (nc -e cat), one writes what it got, upper-cased, to a file.
    # (nc's stdin is held open: at stdin EOF busybox nc would stop before reading the network side)
    target.start_detached("sh", "-c", "sleep 60 | nc -l -p 7001 | tr a-z A-Z > /tmp/out-7001")
    target.start_detached("sh", "-c", "nc -l -p 7003 -e cat")
    wait_until(lambda: all(port in " ".join(target.processes()) for port in ("7001", "7003")), 10)
    time.sleep(0.3)
    forward = PortForwardSession(local_streaming.port_forward_url([7003]))
    results: dict[int, tuple[bytes, bytes]] = {}

    def exchange(index: int, port: int) -> None:
        results[index] = forward.exchange(port, b"payload %d\n" % index)

    # Two concurrent connections on one session: one echoed by nc -e cat, one into a pipe.
    threads = [threading.Thread(target=exchange, args=(0, 7003)), threading.Thread(target=exchange, args=(1, 7001))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    forward.close()
    assert results[0] == (b"payload 0\n", b"")
    assert results[1][1] == b""
    wait_until(lambda: target.run_in("cat", "/tmp/out-7001", check=False).stdout == "PAYLOAD 1\n", 10)


def test_port_forward_to_httpd_parallel(local_streaming: LocalStreaming) -> None:
    target = local_streaming.target
    target.start_detached("httpd", "-p", "127.0.0.1:8080", "-h", "/www")
    time.sleep(0.3)
    forward = PortForwardSession(local_streaming.port_forward_url([8080]))
    replies: list[bytes] = []
    lock = threading.Lock()

    def get() -> None:
        reply, error = forward.exchange(8080, b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")
        with lock:
            replies.append(reply if not error else error)

    threads = [threading.Thread(target=get) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    forward.close()
    assert len(replies) == 2
    for reply in replies:
        assert reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n")[0]
        assert reply.endswith(b"hello from the pod\n")


def test_port_forward_nothing_listening_reports_on_error_stream(local_streaming: LocalStreaming) -> None:
    forward = PortForwardSession(local_streaming.port_forward_url([7999]))
    reply, error = forward.exchange(7999, b"anyone?")
    forward.close()
    assert reply == b""
    assert b"error forwarding port 7999" in error and b"refused" in error.lower()


def test_port_forward_does_not_reach_host_loopback(local_streaming: LocalStreaming) -> None:
    # A listener on the host's 127.0.0.1 must not be what a pod port-forward reaches.
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen(1)
    port = host.getsockname()[1]
    try:
        forward = PortForwardSession(local_streaming.port_forward_url([port]))
        reply, error = forward.exchange(port, b"x")
        forward.close()
        assert b"refused" in error.lower()
    finally:
        host.close()


def test_port_forward_over_websocket(local_streaming: LocalStreaming) -> None:
    target = local_streaming.target
    target.start_detached("sh", "-c", "nc -l -p 7005 -e cat")
    time.sleep(0.3)
    ws = WebSocketClient(local_streaming.port_forward_url([7005]), ["v4.channel.k8s.io"])
    first = [ws.recv(), ws.recv()]
    assert sorted(first) == [(0, b"\x5d\x1b"), (1, b"\x5d\x1b")]  # 7005 little-endian on data and error
    ws.send(0, b"over websocket\n")
    echoed = b""
    while b"\n" not in echoed:
        message = ws.recv()
        assert message is not None
        if message[0] == 0:
            echoed += message[1]
    ws.close()
    assert echoed == b"over websocket\n"


def test_port_forward_connection_limit(streaming_target) -> None:
    streaming = start_local_streaming(streaming_target, max_concurrent_streams=2)
    for port in (7401, 7402):
        streaming_target.start_detached("sh", "-c", f"nc -l -p {port} -e cat")
    wait_until(lambda: all(port in " ".join(streaming_target.processes()) for port in ("7401", "7402")), 10)
    try:
        forward = PortForwardSession(streaming.port_forward_url([7401, 7402]))
        held = [forward.open(7401), forward.open(7402)]
        for data, _ in held:
            data.write(b"still here\n")
            assert data.read(10) == b"still here\n"
        with pytest.raises(ConnectionResetError):
            forward.open(7401)
        for data, _ in held:
            data.close()
            assert data.read_all(10) == b""
        wait_until(lambda: forward.exchange(7999, b"x")[1] != b"", 10, what="a free connection slot")
        forward.close()
    finally:
        streaming.server.stop()
