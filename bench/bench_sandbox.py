"""Pod sandbox latency through the gateway socket.

RunPodSandbox / StopPodSandbox / RemovePodSandbox over 50 pods one after the
other (median and p95, in milliseconds), then 20 pods started at once (wall
time until all are ready, and each call's latency), on a private stack with
the test CNI network (bridge, host-local, portmap).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from cri_api.v1 import api_pb2

from bench.timing import p95, timed
from tests.fixtures_pods import pod_config
from tests.harness import Stack

SEQUENTIAL_PODS = 50
CONCURRENT_PODS = 20


def run() -> dict[str, float | str]:
    stack = Stack()
    try:
        stack.start()
        runtime = stack.runtime
        timings: dict[str, list[float]] = {"run": [], "stop": [], "remove": []}
        for _ in range(SEQUENTIAL_PODS):
            elapsed, reply = timed(
                lambda: runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config()), timeout=120)
            )
            timings["run"].append(elapsed)
            sandbox_id = reply.pod_sandbox_id
            timings["stop"].append(
                timed(lambda: runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120))[0]
            )
            timings["remove"].append(
                timed(lambda: runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120))[0]
            )

        def run_one(_: int) -> tuple[float, str]:
            elapsed, reply = timed(
                lambda: runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config()), timeout=120)
            )
            return elapsed, reply.pod_sandbox_id

        started = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT_PODS) as pool:
            concurrent = list(pool.map(run_one, range(CONCURRENT_PODS)))
        wall = (time.perf_counter() - started) * 1000
        with ThreadPoolExecutor(CONCURRENT_PODS) as pool:
            list(pool.map(
                lambda item: runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=item[1]), timeout=120),
                concurrent,
            ))

        figures: dict[str, float | str] = {}
        for name, values in timings.items():
            figures[f"{name}_median_ms ({SEQUENTIAL_PODS} pods)"] = round(statistics.median(values), 1)
            figures[f"{name}_p95_ms ({SEQUENTIAL_PODS} pods)"] = round(p95(values), 1)
        latencies = [elapsed for elapsed, _ in concurrent]
        figures[f"concurrent_run_wall_ms ({CONCURRENT_PODS} pods)"] = round(wall, 1)
        figures[f"concurrent_run_median_ms ({CONCURRENT_PODS} pods)"] = round(statistics.median(latencies), 1)
        figures[f"concurrent_run_p95_ms ({CONCURRENT_PODS} pods)"] = round(p95(latencies), 1)
        return figures
    finally:
        stack.stop()
