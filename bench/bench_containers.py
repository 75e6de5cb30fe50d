"""Containers: end-to-end pod start, ExecSync latency, and memory.

- pod start = RunPodSandbox + CreateContainer + StartContainer, through the
  gateway socket: median and p95 over 30 pods one after the other, then 20
  pods at once (wall time and each pod's latency);
- ExecSync of `true` in a running container: median and p95 over 50 calls;
- memory: PSS (from /proc/PID/smaps_rollup) of each service idle, and of
  every shim with 20 containers running (mean and max), plus the zygote;
- a chatty container: 20 MB of short lines through its shim into the CRI log
  (throughput, and its shim's PSS once idle again).

On a private stack with a private test registry holding the busybox image.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cri_api.v1 import api_pb2

from bench.proc_stats import children_of, pss_kib, rollup_kib
from bench.stacks import busybox_stack
from bench.timing import p95, timed
from tests.fixtures_pods import pod_config
from tests.harness import SERVICES

SEQUENTIAL_PODS = 30
CONCURRENT_PODS = 20
EXEC_CALLS = 50
CHATTY_OUTPUT_BYTES = 20_000_000


def start_sleeping_pod(runtime: Any, image: str, log_directory: str, command: list[str] | None = None) -> tuple[str, str]:
    """RunPodSandbox + CreateContainer + StartContainer of one `sleep` container
    (or of `command`): (sandbox_id, container_id)."""
    config = pod_config(log_directory=log_directory)
    sandbox_id = runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=120).pod_sandbox_id
    container = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="main"),
        image=api_pb2.ImageSpec(image=image),
        command=command or ["sleep", "3600"],
        log_path="main.log",
    )
    container.linux.security_context.namespace_options.pid = api_pb2.CONTAINER
    container_id = runtime.CreateContainer(
        api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=container, sandbox_config=config), timeout=120
    ).container_id
    runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id), timeout=60)
    return sandbox_id, container_id


def run() -> dict[str, float | str]:
    with busybox_stack() as (stack, image):
        runtime = stack.runtime
        log_dir = stack.root / "pod-logs"

        def start_pod(index: int) -> tuple[float, tuple[str, str]]:
            return timed(lambda: start_sleeping_pod(runtime, image, str(log_dir / str(index))))

        def remove_pod(sandbox_id: str) -> None:
            runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
            runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)

        idle_pss = {service: pss_kib(stack.service_pid(service)) for service in SERVICES}
        sequential = []
        for index in range(SEQUENTIAL_PODS):
            elapsed, (sandbox_id, _) = start_pod(index)
            sequential.append(elapsed)
            remove_pod(sandbox_id)

        started = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT_PODS) as pool:
            concurrent = list(pool.map(start_pod, range(100, 100 + CONCURRENT_PODS)))
        wall = (time.perf_counter() - started) * 1000

        exec_target = concurrent[0][1][1]
        exec_times = [
            timed(lambda: runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=exec_target, cmd=["true"], timeout=10), timeout=60))[0]
            for _ in range(EXEC_CALLS)
        ]

        time.sleep(2)  # let the shims settle into their idle loop
        shim_pids, keeper_pids = [], []
        for _, (_, container_id) in concurrent:
            status = runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=container_id, verbose=True), timeout=20)
            info = json.loads(status.info["info"])
            shim_pids.append(info["shim_pid"])
            keeper_pids.append(info.get("keeper_pid", 0))
        shim_pss = [pss_kib(pid) for pid in shim_pids]
        # Each container's keeper (services/shimd/keeper.py), beside its shim.
        keeper_pss = [pss_kib(pid) for pid in keeper_pids if pid]
        shim_private = [rollup_kib(pid, "Private_Dirty") for pid in shim_pids]
        shim_rss = [rollup_kib(pid, "Rss") for pid in shim_pids]

        # A chatty container: 20 MB of short lines through its shim into the CRI log.
        chatty_log = log_dir / "chatty" / "main.log"
        command = ["sh", "-c", f"yes pyrio-log-line-0123456789 | head -c {CHATTY_OUTPUT_BYTES}; echo; echo done; sleep 3600"]
        started = time.perf_counter()
        chatty = start_sleeping_pod(runtime, image, str(chatty_log.parent), command)
        while not (chatty_log.exists() and chatty_log.read_bytes()[-64:].rstrip().endswith(b" F done")):
            time.sleep(0.05)
        chatty_seconds = time.perf_counter() - started
        time.sleep(2)  # past the shim's idle trim
        status = runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=chatty[1], verbose=True), timeout=20)
        chatty_shim_pss = pss_kib(json.loads(status.info["info"])["shim_pid"])
        remove_pod(chatty[0])
        shimd_pid = stack.service_pid("shimd")
        zygotes = children_of(shimd_pid)
        busy_pss = {service: pss_kib(stack.service_pid(service)) for service in SERVICES}

        with ThreadPoolExecutor(CONCURRENT_PODS) as pool:
            list(pool.map(lambda item: remove_pod(item[1][0]), concurrent))

        figures: dict[str, float | str] = {
            f"pod_start_median_ms ({SEQUENTIAL_PODS} pods)": round(statistics.median(sequential), 1),
            f"pod_start_p95_ms ({SEQUENTIAL_PODS} pods)": round(p95(sequential), 1),
            f"concurrent_pod_start_wall_ms ({CONCURRENT_PODS} pods)": round(wall, 1),
            f"concurrent_pod_start_median_ms ({CONCURRENT_PODS} pods)": round(statistics.median([e for e, _ in concurrent]), 1),
            f"concurrent_pod_start_p95_ms ({CONCURRENT_PODS} pods)": round(p95([e for e, _ in concurrent]), 1),
            f"exec_sync_median_ms ({EXEC_CALLS} calls)": round(statistics.median(exec_times), 1),
            f"exec_sync_p95_ms ({EXEC_CALLS} calls)": round(p95(exec_times), 1),
            f"shim_pss_mean_kib ({CONCURRENT_PODS} containers)": round(statistics.mean(shim_pss), 1),
            f"shim_pss_max_kib ({CONCURRENT_PODS} containers)": max(shim_pss),
            f"keeper_pss_mean_kib ({CONCURRENT_PODS} containers)": round(statistics.mean(keeper_pss or [0]), 1),
            f"shim_private_dirty_mean_kib ({CONCURRENT_PODS} containers)": round(statistics.mean(shim_private), 1),
            f"shim_rss_mean_kib ({CONCURRENT_PODS} containers)": round(statistics.mean(shim_rss), 1),
            "chatty_container_log_mb_per_s (20 MB of 28-byte lines, pod start included)": round(CHATTY_OUTPUT_BYTES / 1e6 / chatty_seconds, 1),
            "chatty_shim_pss_kib (after its 20 MB, idle)": chatty_shim_pss,
        }
        for service in SERVICES:
            figures[f"{service}_pss_idle_kib"] = idle_pss[service]
            figures[f"{service}_pss_kib (with {CONCURRENT_PODS} containers)"] = busy_pss[service]
        if zygotes:
            figures["shim_zygote_pss_kib"] = pss_kib(zygotes[0])
        return figures
