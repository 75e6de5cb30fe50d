"""`bench scale`: how pyrio's per-call costs and memory grow with the pods on a node.

pyrio alone (a private tests.harness Stack, busybox from a local registry,
bench/stacks.py) is grown in steps of pods with one running `sleep` container
each. At every step the bench measures, over CRI:

- Version, ListPodSandbox and ListContainers (all, and by id, state and
  label), ListContainerStats, ListPodSandboxStats, ListPodSandboxMetrics,
  PodSandboxStatus and ContainerStatus: median milliseconds per call;
- the daemons' CPU per relist and stats call (less moved by other load than
  wall time);
- RunPodSandbox + CreateContainer + StartContainer of one more pod, and
  StopPodSandbox + RemovePodSandbox of it (median of CHURN_PODS);
- the daemons' PSS, per process and in all, and memory per pod: everything of
  the runtime's process tree but the containers' own processes, less what the
  daemons held idle before the first pod, divided by the pods
  (bench.compare_workload.memory_figures, as `bench compare` counts it).

The table prints each figure per step and a growth column,
(figure at the last step / at the first) / (last pods / first pods):
1.0 is linear growth, a constant cost is first/last pods (0.2 for 50 -> 250).
Costs above 1.0 are marked SUPER-LINEAR, memory per pod above 0.7 MiB OVER
(issue 14, target 5). Every pod is removed and the stack stopped, also on failure.

Run it from the repo root (it needs root, runc and the CNI plugins, as the tests do):

    python -m bench scale
    PYRIO_BENCH_SCALE_STEPS=5,10 python -m bench scale   # a quick check

Environment: PYRIO_BENCH_SCALE_STEPS (50,110,170,250: pods at each step, growing),
PYRIO_BENCH_SECCOMP (see bench/compare_workload.py).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc
from cri_api.v1 import api_pb2

from bench.compare_runtimes import Pyrio
from bench.compare_workload import LIST_CALLS, RAMP_WORKERS, STATS_CALLS, Pods, median_ms, memory_figures, relist_figures
from bench.proc_stats import total_cpu_seconds, total_pss_kib
from bench.stacks import busybox_stack
from bench.timing import timed

STEPS = [int(item) for item in os.environ.get("PYRIO_BENCH_SCALE_STEPS", "50,110,170,250").split(",")]
CHURN_PODS = 5
IDLE_SETTLE_SECONDS = 3  # past an idle daemon's heap trim
MEMORY_PER_POD_LIMIT_MIB = 0.7
MEMORY_PER_POD = "memory per pod MiB (shims, pod processes, daemon growth)"


def daemon_cpu_ms(rt: Pyrio, call: Callable[[], Any], count: int) -> float:
    """The daemons' CPU per call: unlike wall time, barely moved by the load
    other processes put on the machine."""
    daemons = rt.daemon_pids()
    before = total_cpu_seconds(daemons)
    for _ in range(count):
        call()
    return round((total_cpu_seconds(daemons) - before) * 1000 / count, 2)


def status_figures(rt: Pyrio, pods: Pods) -> dict[str, float]:
    runtime = rt.runtime
    sandbox_id, container_id = pods.started[len(pods.started) // 2]
    figures = {
        "PodSandboxStatus": median_ms(lambda: runtime.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id), timeout=10), LIST_CALLS),
        "ContainerStatus": median_ms(lambda: runtime.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=container_id), timeout=10), LIST_CALLS),
    }
    stats_calls: dict[str, Callable[[], Any]] = {
        "ListContainerStats": lambda: runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=60),
        "ListPodSandboxStats": lambda: runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=60),
        "ListPodSandboxMetrics": lambda: runtime.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest(), timeout=60),
    }
    for name, call in stats_calls.items():
        try:
            if name == "ListPodSandboxMetrics":  # relist_figures has the other two's wall time
                figures[name] = median_ms(call, STATS_CALLS)
            figures[f"{name} CPU ms per call"] = daemon_cpu_ms(rt, call, STATS_CALLS)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
    return figures


def churn_figures(pods: Pods) -> dict[str, float]:
    """One more pod started and removed, CHURN_PODS times: the node stays at its step."""
    starts, teardowns = [], []
    for _ in range(CHURN_PODS):
        elapsed, (sandbox_id, _) = timed(pods.start)
        starts.append(elapsed)
        teardowns.append(sum(pods.stop_and_remove(sandbox_id)))
    return {
        "pod start (Run+Create+StartContainer)": round(statistics.median(starts), 1),
        "Stop+RemovePodSandbox": round(statistics.median(teardowns), 1),
    }


def step_figures(rt: Pyrio, pods: Pods, daemons_before_kib: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    figures.update(relist_figures(rt, pods))
    figures.update(status_figures(rt, pods))
    figures.update(churn_figures(pods))
    # Past the daemons' idle heap trim, as the idle figure it is compared with.
    time.sleep(IDLE_SETTLE_SECONDS)
    figures.update(memory_figures(rt, pods, daemons_before_kib))
    # The same figure at every step under one name.
    return {re.sub(r" at \d+ pods", "", key): value for key, value in figures.items()}


def growth(first: float, last: float) -> float | None:
    if not first:
        return None
    return (last / first) / (STEPS[-1] / STEPS[0])


def verdict(key: str, values: list[float], grown: float | None) -> str:
    if key == MEMORY_PER_POD:
        return "OVER" if max(values) > MEMORY_PER_POD_LIMIT_MIB else ""
    if "/ Version" in key:  # a ratio, not a cost
        return ""
    return "SUPER-LINEAR" if grown is not None and grown > 1.0 else ""


def format_table(by_step: dict[int, dict[str, float]]) -> dict[str, str]:
    rows = {"pods": "".join(f"{pods:>9}" for pods in STEPS) + "   growth"}
    keys: list[str] = []
    for figures in by_step.values():
        keys.extend(key for key in figures if key not in keys)
    for key in keys:
        values = [by_step[pods].get(key) for pods in STEPS]
        cells = "".join(f"{value if value is not None else '-':>9}" for value in values)
        known = [value for value in values if value is not None]
        grown = growth(values[0], values[-1]) if values[0] is not None and values[-1] is not None else None
        rows[key] = f"{cells}   {f'{grown:.2f}' if grown is not None else '-':>6} {verdict(key, known, grown)}".rstrip()
    return rows


def run() -> dict[str, Any]:
    if STEPS != sorted(STEPS) or STEPS[0] < 1:
        raise ValueError(f"PYRIO_BENCH_SCALE_STEPS must grow from at least 1 pod: {STEPS}")
    by_step: dict[int, dict[str, float]] = {}
    with busybox_stack() as (stack, image):
        rt = Pyrio(stack)
        rt.connect()
        pods = Pods(rt, image)
        try:
            time.sleep(IDLE_SETTLE_SECONDS)
            daemons_before_kib = total_pss_kib(rt.daemon_pids())
            for step in STEPS:
                started = time.monotonic()
                with ThreadPoolExecutor(RAMP_WORKERS) as pool:
                    list(pool.map(lambda _: pods.start(), range(step - len(pods.started))))
                print(f"  [{step} pods up in {time.monotonic() - started:.0f}s]", flush=True)
                by_step[step] = step_figures(rt, pods, daemons_before_kib)
                print(f"  [{step} pods measured]", flush=True)
        finally:
            try:
                pods.remove_all()
            finally:
                rt.close_channel()
    figures: dict[str, Any] = {"idle daemons PSS MiB (before pods)": round(daemons_before_kib / 1024, 1)}
    figures.update(format_table(by_step))
    return figures
