"""Slow clients against the real streaming server (issue 15 item 8): a few
hundred slowloris connections are closed after the request head deadline,
cost crigw no thread each, and do not keep a real exec or port-forward out."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from cri_api.v1 import api_pb2

from common.config import StreamingSection
from tests.fixtures_containers import Containers
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
