"""Slow clients against the real streaming server (issue 15 item 8): a few
hundred slowloris connections are closed after the request head deadline,
cost crigw no thread each, and do not keep a real exec or port-forward out."""

from __future__ import annotations

import shutil
import socket
import time
from urllib.parse import urlsplit

import pytest
from cri_api.v1 import api_pb2

from common.config import StreamingSection
from tests.fixtures_containers import Containers
from tests.fixtures_streaming import self_signed_certificate, start_local_streaming
from tests.harness import wait_until
from tests.slowloris import Slowloris, process_usage
from tests.streaming_client import PortForwardSession, spdy_exec

ATTACKERS = 300
DEFAULTS = StreamingSection()


def exec_url(containers: Containers, container_id: str, cmd: list[str]) -> str:
    request = api_pb2.ExecRequest(container_id=container_id, cmd=cmd, stdout=True, stderr=True)
    return containers.runtime.Exec(request, timeout=20).url


def test_slowloris_is_bounded_and_real_clients_get_through(containers: Containers) -> None:
    assert ATTACKERS > DEFAULTS.max_pending_connections  # some are evicted, some reach the deadline
    pod = containers.pod()
    container_id = containers.run(pod, command=["sh", "-c", "nc -ll -p 9000 -e cat"])
    crigw = containers.stack.service_pid("crigw")
    # Warm up what a real session starts (gRPC workers, a session's threads).
    assert spdy_exec(exec_url(containers, container_id, ["echo", "warm"])).stdout == b"warm\n"
    baseline = process_usage(crigw)
    port = urlsplit(exec_url(containers, container_id, ["true"])).port
    assert port

    attack = Slowloris("127.0.0.1", port, ATTACKERS).start()
    try:
        peak = baseline
        # While the attack runs: a real exec and a real port-forward work.
        result = spdy_exec(exec_url(containers, container_id, ["echo", "still served"]))
        assert (result.stdout, result.exit_code) == (b"still served\n", 0)
        url = containers.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=pod[0], port=[9000]), timeout=20).url
        forward = PortForwardSession(url)
        try:
            wait_until(lambda: forward.exchange(9000, b"ping\n") == (b"ping\n", b""), 20, what="port-forward during the attack")
        finally:
            forward.close()

        def all_closed() -> bool:
            nonlocal peak
            usage = process_usage(crigw)
            peak = max(peak, usage, key=lambda item: item.threads)
            return attack.closed_by_server == ATTACKERS

        # Every slow connection is closed by the server, at the latest at the head deadline.
        wait_until(all_closed, DEFAULTS.request_head_timeout + 30, what="the server to close every slow connection")
        # No thread per connection: 300 slow clients, a handful of threads more at most.
        assert peak.threads <= baseline.threads + 16, (baseline, peak)
    finally:
        attack.stop()
    assert process_usage(crigw).fds <= baseline.fds + 16


def test_exec_sessions_leave_no_fds_in_crigw(containers: Containers) -> None:
    """Each session runs in a new thread; its RPC sockets go back to a pool
    instead of staying with the dead thread (4 fds and ~130 KiB a session)."""
    container_id = containers.run(command=["sleep", "600"])
    crigw = containers.stack.service_pid("crigw")
    assert spdy_exec(exec_url(containers, container_id, ["true"])).exit_code == 0
    before = process_usage(crigw)
    for _ in range(30):
        assert spdy_exec(exec_url(containers, container_id, ["true"])).exit_code == 0
    wait_until(lambda: process_usage(crigw).fds <= before.fds + 8, 10, what=f"crigw's fds back near {before.fds}")


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass  # a 408 first, then the end
    except (TimeoutError, socket.timeout):
        return False
    except OSError:
        pass  # reset: closed as well
    return True


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_head_deadline_covers_tls_handshake_and_oldest_waiting_is_evicted(streaming_target, tmp_path) -> None:
    """The mechanism in small: a connection that never starts its TLS
    handshake is closed at the head deadline; past the cap of waiting
    connections the longest-waiting one goes; a real client gets through."""
    cert, key = self_signed_certificate(tmp_path)
    streaming = start_local_streaming(
        streaming_target, tls_cert_file=str(cert), tls_key_file=str(key), request_head_timeout=2.0, max_pending_connections=3
    )
    silent = []
    try:
        address = ("127.0.0.1", streaming.server.port)
        silent = [socket.create_connection(address, timeout=10) for _ in range(3)]
        time.sleep(0.3)  # all three accepted and waiting
        fourth = socket.create_connection(address, timeout=10)
        silent.append(fourth)
        assert _closed_by_peer(silent[0], 5), "the longest-waiting connection was not closed past the cap"
        assert spdy_exec(streaming.exec_url(["echo", "through"])).stdout == b"through\n"
        # The others never sent a ClientHello: closed at the deadline, not before.
        assert not _closed_by_peer(fourth, 0.5)
        assert all(_closed_by_peer(sock, 10) for sock in silent[1:])
    finally:
        for sock in silent:
            sock.close()
        streaming.server.stop()
