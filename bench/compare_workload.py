"""One round of `bench compare`'s workload against one runtime, over CRI only.

The same code drives containerd and pyrio (cri_api stubs on a unix socket);
what it reads of the processes comes from the runtime's process tree
(bench/compare_runtimes.py). Figures are milliseconds unless named otherwise.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from cri_api.v1 import api_pb2

from bench.compare_runtimes import CriRuntime
from bench.proc_stats import PeakRss, cpu_seconds, parent_pid, pss_kib, total_cpu_seconds, total_pss_kib
from bench.timing import p95, timed
from tests.fixtures_pods import pod_config

SEQUENTIAL_PODS = 10
CONCURRENT_PODS = 10
EXEC_CALLS = 50
LIST_CALLS = 50
STATS_CALLS = 20
CHATTY_BYTES = 50_000_000
RAMP_WORKERS = 4
# Both runtimes get the same explicit seccomp choice: unset, pyrio (as CRI-O)
# applies its default profile and containerd none, and loading the filter is
# a large part of every `runc exec`: runc compiles the container's profile
# anew in `runc init` for each exec. RuntimeDefault unless told
# "unconfined", or "localhost": one profile file for both (pyrio's
# RuntimeDefault made concrete), since the two runtimes' RuntimeDefault
# profiles differ (pyrio's has the NETLINK socket and EPERM rules, and
# compiles to ~25% more BPF).
SECCOMP_CHOICE = os.environ.get("PYRIO_BENCH_SECCOMP", "runtime_default")
SECCOMP_PROFILE = {
    "unconfined": api_pb2.SecurityProfile.Unconfined,
    "localhost": api_pb2.SecurityProfile.Localhost,
}.get(SECCOMP_CHOICE, api_pb2.SecurityProfile.RuntimeDefault)


def shared_seccomp_profile(rt: CriRuntime) -> str:
    """The "localhost" mode's profile file in rt's root (the same content for
    every runtime): pyrio's RuntimeDefault for its default capabilities."""
    from common.config import RuntimeSection  # noqa: PLC0415 (only this mode needs pyrio's modules)
    from services.shimd.spec_seccomp import profile_for, runtime_default  # noqa: PLC0415

    path = rt.root / "bench-seccomp.json"
    if not path.exists():
        caps = [f"CAP_{name}" for name in RuntimeSection().default_capabilities]
        path.write_text(json.dumps(profile_for(runtime_default(), caps)))
    return str(path)


class Pods:
    """Pods of one sleeping container each, started and removed over CRI."""

    def __init__(self, rt: CriRuntime, image: str) -> None:
        self.rt = rt
        self.image = image
        self.started: list[tuple[str, str]] = []  # (sandbox id, container id)
        self.index_of: dict[str, int] = {}  # sandbox id -> its `index` label
        self.log_dir_of: dict[str, Path] = {}  # sandbox id -> its log directory (unique across rounds)
        self._counter = 0

    def start(self, command: list[str] | None = None, name: str = "") -> tuple[str, str]:
        self._counter += 1
        index = self._counter
        log_dir = self.rt.root / "pod-logs" / f"{index}-{uuid.uuid4().hex[:8]}"
        config = pod_config(
            name=name or None,
            labels={"bench": "compare", "index": str(index)},
            log_directory=str(log_dir),
            cgroup_parent=self.rt.cgroup_parent,
        )
        runtime = self.rt.runtime
        sandbox_id = runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=120).pod_sandbox_id
        container = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="main"),
            image=api_pb2.ImageSpec(image=self.image),
            command=command or ["sleep", "36000"],
            log_path="main.log",
            labels={"bench": "compare", "index": str(index)},
        )
        container.linux.security_context.seccomp.profile_type = SECCOMP_PROFILE
        container.linux.security_context.seccomp.SetInParent()
        if SECCOMP_PROFILE == api_pb2.SecurityProfile.Localhost:
            container.linux.security_context.seccomp.localhost_ref = shared_seccomp_profile(self.rt)
        container_id = runtime.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=container, sandbox_config=config), timeout=120
        ).container_id
        runtime.StartContainer(api_pb2.StartContainerRequest(container_id=container_id), timeout=60)
        self.started.append((sandbox_id, container_id))
        self.index_of[sandbox_id] = index
        self.log_dir_of[sandbox_id] = log_dir
        return sandbox_id, container_id

    def stop_and_remove(self, sandbox_id: str) -> tuple[float, float]:
        runtime = self.rt.runtime
        stop_ms, _ = timed(lambda: runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120))
        remove_ms, _ = timed(
            lambda: runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
        )
        self.started = [pod for pod in self.started if pod[0] != sandbox_id]
        return stop_ms, remove_ms

    def remove_all(self) -> None:
        with ThreadPoolExecutor(RAMP_WORKERS) as pool:
            list(pool.map(lambda pod: self.stop_and_remove(pod[0]), list(self.started)))

    def container_pid(self, container_id: str) -> int:
        status = self.rt.runtime.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=container_id, verbose=True), timeout=20
        )
        return int(json.loads(status.info["info"]).get("pid", 0))


def median_ms(call: Callable[[], Any], count: int) -> float:
    call()  # warm up
    return round(statistics.median(timed(call)[0] for _ in range(count)), 2)


def cold_pull(rt: CriRuntime, reference: str, compressed_bytes: int) -> dict[str, float]:
    puller = rt.puller_pid()
    with PeakRss(puller) as sampler:
        seconds = timed(lambda: rt.images.PullImage(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=reference)), timeout=600
        ))[0] / 1000
    rt.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=reference)), timeout=120)
    return {
        "cold pull s (5 layers)": round(seconds, 2),
        "cold pull MB/s (compressed)": round(compressed_bytes / seconds / 1e6, 1),
        "cold pull peak RSS MiB (puller)": round(sampler.peak / 2**20, 1),
    }


def start_figures(pods: Pods) -> dict[str, float]:
    sequential = [timed(pods.start)[0] for _ in range(SEQUENTIAL_PODS)]
    teardown = [pods.stop_and_remove(sandbox_id) for sandbox_id, _ in list(pods.started)]
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT_PODS) as pool:
        list(pool.map(lambda _: pods.start(), range(CONCURRENT_PODS)))
    wall = (time.perf_counter() - started) * 1000
    return {
        "pod start median (pod+container)": round(statistics.median(sequential), 1),
        "pod start p95": round(p95(sequential), 1),
        f"{CONCURRENT_PODS} pods at once wall": round(wall, 1),
        "StopPodSandbox median": round(statistics.median(stop for stop, _ in teardown), 1),
        "RemovePodSandbox median": round(statistics.median(remove for _, remove in teardown), 1),
    }


def exec_figures(rt: CriRuntime, container_id: str) -> dict[str, float]:
    request = api_pb2.ExecSyncRequest(container_id=container_id, cmd=["true"], timeout=10)
    rt.runtime.ExecSync(request, timeout=60)
    times = [timed(lambda: rt.runtime.ExecSync(request, timeout=60))[0] for _ in range(EXEC_CALLS)]
    return {"ExecSync median": round(statistics.median(times), 1), "ExecSync p95": round(p95(times), 1)}


def relist_figures(rt: CriRuntime, pods: Pods) -> dict[str, float]:
    runtime = rt.runtime
    sandbox_id, container_id = pods.started[len(pods.started) // 2]
    label = {"index": str(pods.index_of[sandbox_id])}  # matches one pod
    lps = api_pb2.ListPodSandboxRequest
    lc = api_pb2.ListContainersRequest
    calls: dict[str, Callable[[], Any]] = {
        "Version": lambda: runtime.Version(api_pb2.VersionRequest(), timeout=10),
        "ListPodSandbox": lambda: runtime.ListPodSandbox(lps(), timeout=10),
        "ListPodSandbox by id": lambda: runtime.ListPodSandbox(lps(filter=api_pb2.PodSandboxFilter(id=sandbox_id)), timeout=10),
        "ListPodSandbox by state": lambda: runtime.ListPodSandbox(lps(filter=api_pb2.PodSandboxFilter(
            state=api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_READY))), timeout=10),
        "ListPodSandbox by label": lambda: runtime.ListPodSandbox(lps(filter=api_pb2.PodSandboxFilter(label_selector=label)), timeout=10),
        "ListContainers": lambda: runtime.ListContainers(lc(), timeout=10),
        "ListContainers by id": lambda: runtime.ListContainers(lc(filter=api_pb2.ContainerFilter(id=container_id)), timeout=10),
        "ListContainers by state": lambda: runtime.ListContainers(lc(filter=api_pb2.ContainerFilter(
            state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING))), timeout=10),
        "ListContainers by label": lambda: runtime.ListContainers(lc(filter=api_pb2.ContainerFilter(label_selector=label)), timeout=10),
    }
    count = len(pods.started)
    assert len(runtime.ListPodSandbox(lps(), timeout=10).items) == count
    assert len(runtime.ListContainers(lc(), timeout=10).containers) == count
    figures: dict[str, float] = {}
    daemons = rt.daemon_pids()
    for name, call in calls.items():
        cpu_before = total_cpu_seconds(daemons)
        figures[f"{name} at {count} pods"] = median_ms(call, LIST_CALLS)
        if name in ("ListPodSandbox", "ListContainers", "Version"):
            figures[f"{name} CPU ms per call"] = round((total_cpu_seconds(daemons) - cpu_before) * 1000 / (LIST_CALLS + 1), 2)
    for name in ("ListPodSandbox", "ListContainers"):
        figures[f"{name} / Version"] = round(figures[f"{name} at {count} pods"] / figures[f"Version at {count} pods"], 2)
    figures[f"ListContainerStats at {count} pods"] = median_ms(
        lambda: runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=30), STATS_CALLS
    )
    try:
        figures[f"ListPodSandboxStats at {count} pods"] = median_ms(
            lambda: runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=30), STATS_CALLS
        )
    except Exception:  # a runtime without it: no figure
        pass
    return figures


def memory_figures(rt: CriRuntime, pods: Pods, daemons_before_kib: int) -> dict[str, float]:
    """Memory at scale; per pod: everything of the runtime but the containers'
    own processes, less what its daemons held before the pods started."""
    workloads = {pods.container_pid(container_id) for _, container_id in pods.started}
    everything = rt.all_pids() - workloads
    daemons = rt.daemon_pids()
    total = total_pss_kib(everything)
    daemon_total = total_pss_kib(daemons)
    count = len(pods.started)
    figures = {
        f"daemons PSS MiB at {count} pods": round(daemon_total / 1024, 1),
        "memory per pod MiB (shims, pod processes, daemon growth)": round((total - daemons_before_kib) / 1024 / count, 3),
    }
    for name, pid in rt.service_pids().items():
        figures[f"  {name} PSS MiB at {count} pods"] = round(pss_kib(pid) / 1024, 1)
    return figures


def _log_ends_with(path: Any, suffix: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            if handle.seek(0, 2) < CHATTY_BYTES:
                return False
            handle.seek(-64, 2)
            return handle.read().rstrip().endswith(suffix)
    except OSError:
        return False


def chatty_figures(rt: CriRuntime, pods: Pods) -> dict[str, float]:
    """A container writing CHATTY_BYTES of short lines: log MB/s, and the CPU
    the runtime (daemons and the pod's shim) spends per GB of it."""
    command = ["sh", "-c", f"sleep 0.5; yes pyrio-log-line-0123456789 | head -c {CHATTY_BYTES}; echo; echo done; sleep 36000"]
    daemons = rt.daemon_pids()
    cpu_before = total_cpu_seconds(daemons)
    sandbox_id, container_id = pods.start(command)
    shim = parent_pid(pods.container_pid(container_id))
    shim_cpu_before = cpu_seconds(shim)
    log = pods.log_dir_of[sandbox_id] / "main.log"
    started = time.perf_counter()
    while not _log_ends_with(log, b" F done"):
        time.sleep(0.02)
    seconds = time.perf_counter() - started - 0.5
    cpu = total_cpu_seconds(daemons) - cpu_before + cpu_seconds(shim) - shim_cpu_before
    pods.stop_and_remove(sandbox_id)
    return {
        "chatty log MB/s": round(CHATTY_BYTES / 1e6 / seconds, 1),
        "chatty log CPU s per GB": round(cpu / (CHATTY_BYTES / 1e9), 2),
    }


def run_round(rt: CriRuntime, image: str, pull: tuple[str, int], pods_at_scale: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    figures.update(cold_pull(rt, *pull))
    time.sleep(3)  # past an idle daemon's heap trim
    daemons_before_kib = total_pss_kib(rt.daemon_pids())
    pods = Pods(rt, image)
    try:
        figures.update(start_figures(pods))
        with ThreadPoolExecutor(RAMP_WORKERS) as pool:
            list(pool.map(lambda _: pods.start(), range(pods_at_scale - len(pods.started))))
        figures.update(exec_figures(rt, pods.started[0][1]))
        figures.update(relist_figures(rt, pods))
        time.sleep(1)
        figures.update(memory_figures(rt, pods, daemons_before_kib))
        figures.update(chatty_figures(rt, pods))
        started = time.perf_counter()
        pods.remove_all()
        figures[f"teardown of {pods_at_scale} pods s (4 at a time)"] = round(time.perf_counter() - started, 1)
    finally:
        pods.remove_all()
    time.sleep(3)  # past an idle daemon's heap trim
    figures["daemons PSS MiB after teardown"] = round(total_pss_kib(rt.daemon_pids()) / 1024, 1)
    for name, pid in rt.service_pids().items():
        figures[f"  {name} PSS MiB after teardown"] = round(pss_kib(pid) / 1024, 1)
    return figures
