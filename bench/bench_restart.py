"""Restarts: the CRI unavailability window of `supervisorctl restart NAME`.

With a container running, a poller calls, every few milliseconds, a CRI
method that needs the restarted service (Version for crigw, ListImages for
imaged, ListPodSandbox for netd, ListContainers for shimd) while
`supervisorctl restart NAME` runs. The window is the time from the first
failed call to the next successful one. The gRPC channel reconnects with a
small backoff, so the client's own backoff does not dominate the figure.
Then once more for crigw and shimd with a long ExecSync in flight, which a
restart must not wait for. Afterwards the container must still be running
with the same PID.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from bench.bench_containers import start_sleeping_pod
from tests.fixtures_images import start_registry
from tests.harness import Stack
from tests.oci_images import push_busybox

POLL_INTERVAL_SECONDS = 0.005
CALL_TIMEOUT_SECONDS = 1.0
ROUNDS = 3
# Reconnect quickly after the gateway's socket comes back.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 50),
]


def probes(channel: grpc.Channel) -> dict[str, Callable[[], Any]]:
    runtime = api_pb2_grpc.RuntimeServiceStub(channel)
    images = api_pb2_grpc.ImageServiceStub(channel)
    return {
        "crigw": lambda: runtime.Version(api_pb2.VersionRequest(), timeout=CALL_TIMEOUT_SECONDS),
        "imaged": lambda: images.ListImages(api_pb2.ListImagesRequest(), timeout=CALL_TIMEOUT_SECONDS),
        "netd": lambda: runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=CALL_TIMEOUT_SECONDS),
        "shimd": lambda: runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=CALL_TIMEOUT_SECONDS),
    }


def unavailability_window(stack: Stack, service: str, probe: Callable[[], Any]) -> float:
    """Seconds without a successful answer during `supervisorctl restart service`.

    A call made while the service is down either fails (UNAVAILABLE) or
    waits for the new process, so the figure is the longest gap between two
    successful answers, which counts both.
    """
    successes: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                probe()
                successes.append(time.monotonic())
            except grpc.RpcError:
                pass
            time.sleep(POLL_INTERVAL_SECONDS)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        time.sleep(0.2)
        restart_started = time.monotonic()
        stack.supervisorctl("restart", service)
        restarted = time.monotonic()
        # supervisorctl returns once the new process counts as RUNNING
        # (startsecs); wait for answers after that.
        deadline = restarted + 30
        while time.monotonic() < deadline and not (successes and successes[-1] > restarted + 0.2):
            time.sleep(0.05)
    finally:
        done.set()
        poller.join()
    if not successes or successes[-1] <= restarted:
        raise RuntimeError(f"{service} did not answer again within 30s of its restart")
    around = [at for at in successes if at >= restart_started - 0.1]
    return max(later - earlier for earlier, later in zip(around, around[1:]))


def _ignore_errors(call: Callable[[], Any]) -> None:
    try:
        call()
    except grpc.RpcError:
        pass


def run() -> dict[str, float | str]:
    workdir = Path(tempfile.mkdtemp(prefix="pyrio-bench-registry-"))
    registry = start_registry(workdir, workdir / "storage", "bench")
    stack = Stack()
    channel: grpc.Channel | None = None
    try:
        image = push_busybox(registry, "bench/busybox", "latest").reference
        stack.start()
        runtime = stack.runtime
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
        _, container_id = start_sleeping_pod(runtime, image, str(stack.root / "pod-logs"))

        def container_pid() -> int:
            status = stack.runtime.ContainerStatus(
                api_pb2.ContainerStatusRequest(container_id=container_id, verbose=True), timeout=20
            )
            assert status.status.state == api_pb2.CONTAINER_RUNNING
            return json.loads(status.info["info"])["pid"]

        pid_before = container_pid()
        channel = grpc.insecure_channel(f"unix://{stack.socket}", options=CHANNEL_OPTIONS)
        figures: dict[str, float | str] = {}
        for service, probe in probes(channel).items():
            windows = []
            for _ in range(ROUNDS):
                windows.append(unavailability_window(stack, service, probe))
                stack.wait_ready()
            figures[f"{service}_restart_unavailable_ms (median of {ROUNDS})"] = round(statistics.median(windows) * 1000, 1)
            figures[f"{service}_restart_unavailable_ms (max of {ROUNDS})"] = round(max(windows) * 1000, 1)
        # A restart must not wait for calls in flight (a long ExecSync here).
        for service in ("crigw", "shimd"):
            request = api_pb2.ExecSyncRequest(container_id=container_id, cmd=["sleep", "10"], timeout=15)
            caller = threading.Thread(target=_ignore_errors, args=(lambda: runtime.ExecSync(request, timeout=30),))
            caller.start()
            time.sleep(0.5)
            window = unavailability_window(stack, service, probes(channel)[service])
            figures[f"{service}_restart_unavailable_ms (ExecSync in flight)"] = round(window * 1000, 1)
            caller.join()
            stack.wait_ready()
        if container_pid() != pid_before:
            raise RuntimeError("the container's PID changed across the restarts")
        figures["container_kept_running"] = "yes"
        return figures
    finally:
        if channel is not None:
            channel.close()
        stack.stop()
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
