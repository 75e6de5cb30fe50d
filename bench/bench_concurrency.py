"""50 concurrent CRI clients against 20 running containers (issue 15 item 14).

Each client has its own gRPC channel to the gateway socket (as 50 kubelets'
worth of callers would) and runs ROUNDS rounds of ListContainers,
ContainerStatus of a random container, and ExecSync of `true` in a random
container, all clients at once. Reported: p50 and p99 latency of each call,
calls that failed, and the wall time. On a private stack with a private test
registry.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from bench.bench_containers import start_sleeping_pod
from bench.stacks import busybox_stack
from bench.timing import percentile

CLIENTS = 50
CONTAINERS = 20
ROUNDS = 10
CALLS = ("ListContainers", "ContainerStatus", "ExecSync")


def _client(socket_path: Path, container_ids: list[str], start: threading.Barrier, seed: int) -> dict[str, list[float]]:
    """One client's latencies (ms) per call; a failed call counts under "<call>_failed"."""
    chooser = random.Random(seed)
    latencies: dict[str, list[float]] = {name: [] for name in CALLS}
    failures: dict[str, list[float]] = {f"{name}_failed": [] for name in CALLS}
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        runtime.Version(api_pb2.VersionRequest(), timeout=30)  # connected before the clock starts
        start.wait()
        for _ in range(ROUNDS):
            calls = (
                ("ListContainers", lambda: runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=60)),
                ("ContainerStatus", lambda: runtime.ContainerStatus(
                    api_pb2.ContainerStatusRequest(container_id=chooser.choice(container_ids)), timeout=60)),
                ("ExecSync", lambda: runtime.ExecSync(
                    api_pb2.ExecSyncRequest(container_id=chooser.choice(container_ids), cmd=["true"], timeout=30), timeout=60)),
            )
            for name, call in calls:
                started = time.perf_counter()
                try:
                    call()
                except grpc.RpcError:
                    failures[f"{name}_failed"].append(0.0)
                    continue
                latencies[name].append((time.perf_counter() - started) * 1000)
    return {**latencies, **failures}


def run() -> dict[str, float | str]:
    with busybox_stack() as (stack, image):
        runtime = stack.runtime
        log_dir = stack.root / "pod-logs"
        with ThreadPoolExecutor(5) as pool:
            started_pods = list(pool.map(lambda index: start_sleeping_pod(runtime, image, str(log_dir / str(index))), range(CONTAINERS)))
        container_ids = [container_id for _, container_id in started_pods]

        start = threading.Barrier(CLIENTS + 1)
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(_client, stack.socket, container_ids, start, seed) for seed in range(CLIENTS)]
            start.wait()
            began = time.perf_counter()
            results = [future.result() for future in futures]
            wall = time.perf_counter() - began

        figures: dict[str, float | str] = {
            "load": f"{CLIENTS} clients x {ROUNDS} rounds of (ListContainers, ContainerStatus, ExecSync true), {CONTAINERS} containers",
            "wall_s": round(wall, 1),
        }
        for name in CALLS:
            values = [value for result in results for value in result[name]]
            failed = sum(len(result[f"{name}_failed"]) for result in results)
            if values:
                figures[f"{name}_p50_ms"] = round(statistics.median(values), 1)
                figures[f"{name}_p99_ms"] = round(percentile(values, 0.99), 1)
            figures[f"{name}_failed"] = failed
        for sandbox_id, _ in started_pods:
            runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
            runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
        return figures
