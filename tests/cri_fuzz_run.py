"""Send tests.cri_fuzz requests to a running stack and tally the answers.

`fuzz(stack, anchors, calls, seed, ...)` sends `calls` requests spread evenly
over every RuntimeService and ImageService RPC (a few at a time, each with
its own deadline, the whole run bounded in time), counts the gRPC codes per
method, and keeps every INTERNAL / UNKNOWN answer with a short repr of its
request. Every few hundred calls, and at the end, `sweep` removes what the
fuzzed calls created (pods, containers, images) and the anchors are made
again if a fuzzed call took them down.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2
from google.protobuf import text_format
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from tests.cri_fuzz import METHODS, Anchors, CriFuzzer
from tests.fixtures_pods import pod_config
from tests.harness import SERVICES, Stack

CALL_TIMEOUT = 15.0
SWEEP_EVERY = 50  # the anchors are made again this often: destructive calls take them down
BAD_CODES = ("INTERNAL", "UNKNOWN")


@dataclass
class FuzzReport:
    by_method: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    bad: list[tuple[str, str, str, str]] = field(default_factory=list)  # method, code, details, request
    cleanup_failures: list[str] = field(default_factory=list)
    calls: int = 0
    seconds: float = 0.0

    def totals(self) -> Counter:
        total: Counter = Counter()
        for counts in self.by_method.values():
            total.update(counts)
        return total

    def table(self) -> str:
        codes = sorted(self.totals())
        lines = [f"{'method':<28}" + "".join(f"{code[:12]:>13}" for code in codes)]
        for method in sorted(self.by_method):
            lines.append(f"{method:<28}" + "".join(f"{self.by_method[method].get(code, 0):>13}" for code in codes))
        totals = self.totals()
        lines.append(f"{'TOTAL':<28}" + "".join(f"{totals[code]:>13}" for code in codes))
        return "\n".join(lines)


def short_repr(request: Message, limit: int = 300) -> str:
    text = text_format.MessageToString(request, as_one_line=True)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def call(channel: grpc.Channel, method: MethodDescriptor, request: bytes) -> tuple[str, str]:
    """(gRPC code name, details) of one call of a serialized request; a stream is
    read until its deadline. Serialized beforehand so that a client-side
    serialization error is never counted as the server's INTERNAL."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_type = api_pb2.__dict__[method.output_type.name]
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=bytes,
                                          response_deserializer=response_type.FromString)
            for _ in stream(request, timeout=1.0):
                pass
        else:
            channel.unary_unary(path, request_serializer=bytes,
                                response_deserializer=response_type.FromString)(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""
    return "OK", ""


def make_anchors(stack: Stack, image: str, registry_host: str) -> Anchors:
    scratch = stack.root / "fuzz"
    scratch.mkdir(exist_ok=True)
    config = pod_config(log_directory=str(scratch / "pod-logs"))
    container = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="anchor"), image=api_pb2.ImageSpec(image=image),
        command=["sleep", "3600"], log_path="anchor.log",
    )
    anchors = Anchors(image=image, registry_host=registry_host, scratch=scratch, cgroup_parent=stack.cgroup_parent,
                      pod_config=config, container_config=container)
    restore_anchors(stack, anchors)
    return anchors


def restore_anchors(stack: Stack, anchors: Anchors) -> None:
    """Pull the image and run the anchor pod and container again where a fuzzed call removed or stopped them."""
    runtime, images = stack.runtime, stack.images
    if not images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=anchors.image)), timeout=30).image.id:
        images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=anchors.image)), timeout=120)
    running = [c.id for c in runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers
               if c.id == anchors.container_id and c.state == api_pb2.CONTAINER_RUNNING]
    if running:
        return
    anchors.pod_config.metadata.uid = f"anchor-{time.monotonic_ns():x}"
    anchors.pod_sandbox_id = runtime.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=anchors.pod_config), timeout=120).pod_sandbox_id
    anchors.container_id = runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=anchors.pod_sandbox_id, config=anchors.container_config, sandbox_config=anchors.pod_config),
        timeout=120).container_id
    runtime.StartContainer(api_pb2.StartContainerRequest(container_id=anchors.container_id), timeout=60)


def sweep(stack: Stack, keep: Anchors | None = None, strict: bool = True) -> list[str]:
    """Stop and remove every pod, container and image on the stack but the
    anchors'. strict: the first failure raises; else every failure is returned."""
    runtime, images = stack.runtime, stack.images
    keep_ids = {keep.pod_sandbox_id, keep.container_id} if keep else set()
    failures: list[str] = []

    def attempt(what: str, action) -> None:
        try:
            action()
        except grpc.RpcError as error:
            # Mid-run, the anchor may hold an image under another name; at the end nothing may.
            if keep is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION and what.startswith("RemoveImage"):
                return
            if strict:
                raise
            failures.append(f"{what}: {error.code().name} {error.details()}")

    kept_image_ids = set()
    for container in runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30).containers:
        if container.id in keep_ids:
            kept_image_ids.add(container.image_ref)
            continue
        attempt(f"StopContainer {container.id[:12]}", lambda: runtime.StopContainer(
            api_pb2.StopContainerRequest(container_id=container.id, timeout=1), timeout=60))
        attempt(f"RemoveContainer {container.id[:12]}", lambda: runtime.RemoveContainer(
            api_pb2.RemoveContainerRequest(container_id=container.id), timeout=60))
    for sandbox in runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
        if sandbox.id in keep_ids:
            continue
        attempt(f"StopPodSandbox {sandbox.id[:12]}", lambda: runtime.StopPodSandbox(
            api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=120))
        attempt(f"RemovePodSandbox {sandbox.id[:12]}", lambda: runtime.RemovePodSandbox(
            api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=120))
    for image in images.ListImages(api_pb2.ListImagesRequest(), timeout=30).images:
        if keep is None or (keep.image not in image.repo_tags and image.id not in kept_image_ids):
            attempt(f"RemoveImage {image.id[:19]}", lambda: images.RemoveImage(
                api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image.id)), timeout=60))
    return failures


def services_running(stack: Stack) -> dict[str, int]:
    """PID of each service now (0 when supervisord does not say RUNNING)."""
    states = dict(line.split()[:2] for line in stack.supervisorctl("status", check=False).splitlines() if line.strip())
    return {service: stack.service_pid(service) if states.get(service) == "RUNNING" else 0 for service in SERVICES}


def fuzz(stack: Stack, anchors: Anchors, calls: int, seed: int, budget_s: float = 300.0, workers: int = 4) -> FuzzReport:
    fuzzer = CriFuzzer(seed, anchors)
    report = FuzzReport()
    channel = grpc.insecure_channel(f"unix://{stack.socket}", options=[
        ("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)])
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(workers) as pool:
            while report.calls < calls and time.monotonic() - started < budget_s:
                batch = []
                for index in range(min(SWEEP_EVERY, calls - report.calls)):
                    method = METHODS[(report.calls + index) % len(METHODS)]
                    batch.append((method, fuzzer.request(method)))
                results = pool.map(lambda item: call(channel, item[0], item[1].SerializeToString()), batch)
                for (method, request), (code, details) in zip(batch, results):
                    report.by_method[method.name][code] += 1
                    if code in BAD_CODES:
                        report.bad.append((method.name, code, details[:300], short_repr(request)))
                report.calls += len(batch)
                if report.calls % 1000 < SWEEP_EVERY:
                    print(f"  fuzz: {report.calls} calls in {time.monotonic() - started:.0f}s", flush=True)
                report.cleanup_failures += sweep(stack, keep=anchors, strict=False)
                restore_anchors(stack, anchors)
    finally:
        channel.close()
        report.seconds = time.monotonic() - started
    return report


def log_lines(stack: Stack, needle: str, limit: int = 20) -> list[str]:
    """Lines of every service log that mention `needle` (a traceback's exception name, say)."""
    found = []
    for path in sorted(Path(stack.supervisor_dir).glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if needle in line:
                found.append(f"{path.name}: {line[:400]}")
    return found[-limit:]
