"""Pod sandbox latency through the gateway socket.

The PSS of a shared-PID pod's PID 1; RunPodSandbox / StopPodSandbox / RemovePodSandbox over 50 pods one after the
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
from tests.fixtures_pods import pod_config, sandbox_info
from tests.harness import Stack

SEQUENTIAL_PODS = 50
CONCURRENT_PODS = 20


def holder_pss_kib(stack: Stack) -> float:
    """PSS of a shared-PID pod's PID 1 (services/netd/pod_init.py), in KiB."""
    reply = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config(pid_mode=api_pb2.POD)), timeout=120)
    try:
        holder = int(sandbox_info(stack, reply.pod_sandbox_id)["pid_holder"])
        with open(f"/proc/{holder}/smaps_rollup") as handle:
            return float(next(line.split()[1] for line in handle if line.startswith("Pss:")))
    finally:
        stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=reply.pod_sandbox_id), timeout=120)


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

        figures: dict[str, float | str] = {"shared_pid_pod_holder_pss_kib": holder_pss_kib(stack)}
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
