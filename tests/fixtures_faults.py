"""Fixtures for the fault tests (issue 6): killing services, patient CRI calls,
tick-counting containers, and the "nothing left on the node" assertion.

`Patient` wraps the CRI over its own gRPC channel (small reconnect backoff):
each call has a deadline, is retried while the answer is UNAVAILABLE (a
service is down or restarting), and every attempt is recorded, so a test can
assert that no call ever hung (no DEADLINE_EXCEEDED, every attempt ended
within its deadline) and that the only error seen during outages was
UNAVAILABLE.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.fixtures_containers import Containers, TestImages, parse_cri_log
from tests.fixtures_pods import host_local_allocations
from tests.harness import SERVICES, Stack, leak_report, processes_in_cgroups, processes_of_root, wait_until

# Reconnect to a restarted gateway quickly: the default backoff starts at 1 s.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 200),
]
# How far past its deadline a call may end and still count as honouring it.
DEADLINE_SLACK_SECONDS = 1.0

# Prints tick0, tick1, ... every 50 ms until /tmp/finish exists, then exits 42.
TICKER = ["sh", "-c", "i=0; while [ ! -e /tmp/finish ]; do echo tick$i; i=$((i+1)); usleep 50000; done; echo bye; exit 42"]


def kill_service(stack: Stack, service: str) -> int:
    """SIGKILL a service by the PID supervisord reports; returns that PID."""
    pid = stack.service_pid(service)
    assert pid, f"{service} is not running"
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_restarted(stack: Stack, service: str, old_pid: int, timeout: float = 30.0) -> int:
    return wait_until(
        lambda: (pid := stack.service_pid(service)) not in (0, old_pid) and pid, timeout, what=f"{service} restarted"
    )


def wait_all_running(stack: Stack, timeout: float = 60.0) -> None:
    for service in SERVICES:
        stack.wait_service_running(service, timeout)
    stack.wait_ready(timeout)


def ticks_in(log_text: str) -> list[int]:
    """The tick numbers of a TICKER container's CRI log, in log order."""
    numbers = []
    for _, _, tag, content in parse_cri_log(log_text):
        if tag == "F" and content.startswith("tick"):
            numbers.append(int(content[4:]))
    return numbers


def assert_ticks_contiguous(log_text: str, at_least: int = 1) -> list[int]:
    """No lost and no duplicated line: the ticks are exactly 0..n-1."""
    numbers = ticks_in(log_text)
    assert len(numbers) >= at_least, f"only {len(numbers)} ticks in the log"
    if numbers != list(range(len(numbers))):
        gaps = [(a, b) for a, b in zip(numbers, numbers[1:]) if b != a + 1]
        raise AssertionError(f"log ticks are not contiguous: {len(numbers)} ticks, breaks at {gaps[:10]}")
    return numbers


def assert_no_leaks(stack: Stack) -> None:
    """Every category of leak_report is empty, no IP stays allocated, and no
    service keeps state of a pod or container (call once all are removed)."""
    try:
        wait_until(lambda: not any(leak_report(stack).values()), 10, what="no leftovers")
    except TimeoutError:
        pass
    report = leak_report(stack)
    assert not any(report.values()), report
    assert host_local_allocations(stack) == []
    assert_state_clean(stack)


def assert_state_clean(stack: Stack) -> None:
    """With every pod removed, no service keeps a record, a container or pod
    directory, a rootfs, a CNI cache entry, a socket or a temp file of it."""
    leftovers = []
    for directory in (
        stack.state_dir / "shimd" / "containers",
        stack.state_dir / "netd" / "sandboxes",
        stack.state_dir / "netd" / "cni",
        stack.state_dir / "netd" / "pods",
        stack.state_dir / "imaged" / "rootfs",
        stack.state_dir / "imaged" / "containers",
        stack.state_dir / "imaged" / "tmp",
        stack.run_dir / "shims",
        stack.run_dir / "netns",
        stack.run_dir / "ipcns",
        stack.run_dir / "utsns",
        stack.run_dir / "pidns",
    ):
        if directory.is_dir():
            leftovers += [str(path) for path in directory.iterdir()]
    for path in stack.state_dir.rglob("*.tmp"):
        leftovers.append(str(path))
    assert leftovers == [], leftovers


def stack_processes(stack: Stack) -> list[int]:
    """Every process of the stack that is not supervisord or a daemon:
    shims, containers, pod PID holders."""
    return sorted(set(processes_of_root(stack.root) + processes_in_cgroups(stack.cgroup_parent)))


# --- patient CRI calls ----------------------------------------------------------


@dataclass
class Attempt:
    method: str
    code: grpc.StatusCode
    elapsed: float
    deadline: float


@dataclass
class CallRecord:
    attempts: list[Attempt] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts.append(attempt)

    def codes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for attempt in self.attempts:
            counts[attempt.code.name] = counts.get(attempt.code.name, 0) + 1
        return counts

    def late(self) -> list[Attempt]:
        return [a for a in self.attempts if a.elapsed > a.deadline + DEADLINE_SLACK_SECONDS]


class OutageTooLong(AssertionError):
    pass


class Patient:
    """CRI calls that ride out service restarts (see the module docstring)."""

    def __init__(self, stack: Stack, budget: float = 60.0) -> None:
        self.stack = stack
        self.budget = budget
        self.channel = grpc.insecure_channel(f"unix://{stack.socket}", options=CHANNEL_OPTIONS)
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        self.record = CallRecord()

    def close(self) -> None:
        self.channel.close()

    def once(self, method: str, request: Any, timeout: float) -> Any:
        """One attempt; the RpcError propagates (recorded either way)."""
        stub = self.images if method in ("PullImage", "ListImages", "ImageStatus", "RemoveImage", "ImageFsInfo") else self.runtime
        started = time.monotonic()
        try:
            reply = getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            self.record.add(Attempt(method, exc.code(), time.monotonic() - started, timeout))
            raise
        self.record.add(Attempt(method, grpc.StatusCode.OK, time.monotonic() - started, timeout))
        return reply

    def call(self, method: str, request: Any, timeout: float = 20.0, retry_on: tuple[grpc.StatusCode, ...] = ()) -> Any:
        """Retry while UNAVAILABLE (or a code in retry_on) until the budget is spent."""
        give_up = time.monotonic() + self.budget
        while True:
            try:
                return self.once(method, request, timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE and exc.code() not in retry_on:
                    raise
                if time.monotonic() > give_up:
                    raise OutageTooLong(f"{method} still {exc.code().name} after {self.budget}s: {exc.details()}") from exc
            time.sleep(0.1)

    def resolve(
        self,
        what: str,
        attempt: Callable[[], Any],
        outcome: Callable[[], Any],
        known_after_retry: tuple[grpc.StatusCode, ...],
    ) -> Any:
        """A non-idempotent call: after an attempt whose outcome is unknown
        (UNAVAILABLE: the reply may be lost), ask `outcome()` (None while the
        call has not taken effect) before trying again. A code in
        `known_after_retry` (ALREADY_EXISTS for a create) is then the lost
        attempt's doing, not an error."""
        give_up = time.monotonic() + self.budget
        ambiguous = False
        while True:
            if ambiguous:
                found = self.call_find(outcome)
                if found is not None:
                    return found
            try:
                return attempt()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE and not (ambiguous and exc.code() in known_after_retry):
                    raise
                ambiguous = True
                if time.monotonic() > give_up:
                    raise OutageTooLong(f"{what}: no outcome after {self.budget}s: {exc.details()}") from exc
            time.sleep(0.1)

    def call_find(self, find: Callable[[], Any]) -> Any:
        give_up = time.monotonic() + self.budget
        while True:
            try:
                return find()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                    raise
            time.sleep(0.1)

    # --- the CRI calls the fault tests make ---------------------------------

    def run_pod(self, config: api_pb2.PodSandboxConfig) -> str:
        def find() -> str | None:
            for item in self.once("ListPodSandbox", api_pb2.ListPodSandboxRequest(), 10).items:
                if item.metadata.uid == config.metadata.uid and item.metadata.name == config.metadata.name:
                    return item.id
            return None

        request = api_pb2.RunPodSandboxRequest(config=config)
        return self.resolve(
            "RunPodSandbox",
            lambda: self.once("RunPodSandbox", request, 30).pod_sandbox_id,
            find,
            (grpc.StatusCode.ALREADY_EXISTS,),
        )

    def create(self, sandbox_id: str, config: api_pb2.ContainerConfig, sandbox_config: api_pb2.PodSandboxConfig) -> str:
        def find() -> str | None:
            request = api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(pod_sandbox_id=sandbox_id))
            for item in self.once("ListContainers", request, 10).containers:
                if item.metadata.name == config.metadata.name and item.metadata.attempt == config.metadata.attempt:
                    return item.id
            return None

        request = api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config)
        return self.resolve(
            "CreateContainer",
            lambda: self.once("CreateContainer", request, 30).container_id,
            find,
            (grpc.StatusCode.ALREADY_EXISTS,),
        )

    def start(self, container_id: str) -> None:
        """StartContainer; after an attempt with an unknown outcome, a
        container that is no longer CREATED was started by it."""
        request = api_pb2.StartContainerRequest(container_id=container_id)
        self.resolve(
            "StartContainer",
            lambda: self.once("StartContainer", request, 30),
            lambda: True if self.status(container_id).state != api_pb2.CONTAINER_CREATED else None,
            (grpc.StatusCode.FAILED_PRECONDITION,),
        )

    def status(self, container_id: str, verbose: bool = False) -> api_pb2.ContainerStatus:
        request = api_pb2.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self.call("ContainerStatus", request, 10).status

    def info(self, container_id: str) -> dict[str, Any]:
        import json

        request = api_pb2.ContainerStatusRequest(container_id=container_id, verbose=True)
        return json.loads(self.call("ContainerStatus", request, 10).info["info"])

    def stop(self, container_id: str, timeout: int = 0) -> None:
        self.call("StopContainer", api_pb2.StopContainerRequest(container_id=container_id, timeout=timeout), timeout + 40)

    def remove(self, container_id: str) -> None:
        self.call("RemoveContainer", api_pb2.RemoveContainerRequest(container_id=container_id), 60)

    def exec(self, container_id: str, *cmd: str) -> api_pb2.ExecSyncResponse:
        request = api_pb2.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=5)
        return self.call("ExecSync", request, 30)

    def stop_pod(self, sandbox_id: str) -> None:
        self.call("StopPodSandbox", api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), 60)

    def remove_pod(self, sandbox_id: str) -> None:
        self.call("RemovePodSandbox", api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), 60)

    def pods(self) -> list[api_pb2.PodSandbox]:
        return list(self.call("ListPodSandbox", api_pb2.ListPodSandboxRequest(), 10).items)

    def containers(self) -> list[api_pb2.Container]:
        return list(self.call("ListContainers", api_pb2.ListContainersRequest(), 10).containers)


@pytest.fixture
def patient(fresh_stack: Stack) -> Iterator[Patient]:
    own = Patient(fresh_stack)
    try:
        yield own
    finally:
        own.close()


@pytest.fixture
def fault_containers(fresh_stack: Stack, test_images: TestImages) -> Iterator[Containers]:
    """Containers on a fresh stack, with the busybox image already pulled."""
    own = Containers(fresh_stack, test_images)
    own.pull(test_images.busybox.reference)
    try:
        yield own
    finally:
        own.cleanup()


def log_file_of(containers: Containers, name: str = "main") -> Path:
    """A container's log, found on disk (the gateway may be down)."""
    files = list(containers.log_root.rglob(f"{name}.log"))
    assert len(files) == 1, files
    return files[0]


# --- a runtime that lingers in `create` and `delete` ------------------------------

# Wraps runc: `create` and `delete` first note that they started (a marker
# file per command) and wait SLOW_SECONDS, so a test can kill a service in
# the middle of CreateContainer or RemoveContainer.
SLOW_SECONDS = 3
SLOW_RUNTIME = """#!/bin/sh
for arg in "$@"; do
    case "$arg" in
    create|delete) touch {markers}-$arg; sleep {seconds}; break;;
    esac
done
exec /usr/sbin/runc "$@"
"""


class SlowRuntimeStack(Stack):
    """A private stack with a runtime handler "slow" (runc, lingering in
    create and delete). Its runc root is runc's own, so leak_report sees
    its containers."""

    def __init__(self) -> None:
        super().__init__()
        self.markers = self.root / "runtime-started"
        wrapper = self.root / "slow-runc"
        wrapper.write_text(SLOW_RUNTIME.format(markers=self.markers, seconds=SLOW_SECONDS))
        wrapper.chmod(0o755)
        runc_root = str(self.run_dir / "runtimes" / "runc")
        self.config["runtime"]["runtimes"] = {
            "runc": {"path": "/usr/sbin/runc"},
            "crun": {"path": "/usr/bin/crun"},
            "slow": {"path": str(wrapper), "root": runc_root},
        }
        self.write_config()

    def runtime_started(self, command: str) -> bool:
        """Whether the slow runtime's `command` (create, delete) has begun."""
        return Path(f"{self.markers}-{command}").exists()


@pytest.fixture
def slow_runtime_stack() -> Iterator[SlowRuntimeStack]:
    own = SlowRuntimeStack()
    try:
        own.start()
        yield own
    finally:
        own.stop()
