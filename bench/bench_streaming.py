"""Streaming: exec round-trip latency and port-forward throughput on loopback.

The streaming server runs in this process against a busybox runc container
and a network namespace of our own (tests/fixtures_streaming.py), so the
figures are the server's: SPDY framing, the runc exec backend, the netns relay.
The client is the test suite's independent SPDY client.
"""

from __future__ import annotations

import statistics
import time

from tests.fixtures_streaming import own_streaming_target, start_local_streaming
from tests.harness import wait_until
from tests.streaming_client import PortForwardSession, spdy_exec

EXEC_ROUNDS = 30
TRANSFER_BYTES = 100 * 1024 * 1024
CHUNK = 256 * 1024


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run() -> dict[str, float | str]:
    figures: dict[str, float | str] = {}
    with own_streaming_target() as target:
        streaming = start_local_streaming(target)
        try:
            # Exec: stream open (upgrade) to exit status read, `true` in the container.
            latencies = []
            for _ in range(EXEC_ROUNDS):
                url = streaming.exec_url(["true"])
                started = time.perf_counter()
                result = spdy_exec(url)
                latencies.append((time.perf_counter() - started) * 1000)
                assert result.exit_code == 0
            figures["exec_roundtrip_ms_p50"] = round(statistics.median(latencies), 1)
            figures["exec_roundtrip_ms_p95"] = round(_percentile(latencies, 0.95), 1)

            # Port-forward, pod -> client: 100 MB from dd through nc.
            target.start_detached("sh", "-c", f"dd if=/dev/zero bs={CHUNK} count={TRANSFER_BYTES // CHUNK} 2>/dev/null | nc -l -p 7300")
            target.start_detached("sh", "-c", "sleep 600 | nc -l -p 7301 > /dev/null")
            wait_until(lambda: all(p in " ".join(target.processes()) for p in ("7300", "7301")), 10)
            forward = PortForwardSession(streaming.port_forward_url([7300, 7301]))
            data, error = forward.open(7300)
            started = time.perf_counter()
            received = 0
            while chunk := data.read(60):
                received += len(chunk)
            elapsed = time.perf_counter() - started
            assert received == TRANSFER_BYTES, (received, error.read_all(5))
            figures["portforward_download_MBps_100MB"] = round(TRANSFER_BYTES / elapsed / 1e6, 1)

            # Port-forward, client -> pod: 100 MB into nc > /dev/null.
            data, error = forward.open(7301)
            block = b"\0" * CHUNK
            started = time.perf_counter()
            for _ in range(TRANSFER_BYTES // CHUNK):
                data.write(block)
            data.close()
            data.read_all(120)  # the pod side closes after reading everything
            elapsed = time.perf_counter() - started
            figures["portforward_upload_MBps_100MB"] = round(TRANSFER_BYTES / elapsed / 1e6, 1)
            forward.close()
        finally:
            streaming.server.stop()
    return figures
