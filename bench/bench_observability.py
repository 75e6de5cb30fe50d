"""Observability figures (issue 13) on a private stack with busybox:

- event latency: a container's exit (its finished_at, taken by the shim when
  it reaps the init) to the STOPPED event read by a GetContainerEvents client;
- the cost of events on pod start: RunPodSandbox + CreateContainer +
  StartContainer with no stream open, then with two open;
- the scrape at 110 pods (one running container each): /metrics, and the
  kubelet's ListPodSandboxMetrics and ListPodSandboxStats.
"""

from __future__ import annotations

import statistics
import time
import urllib.request

from cri_api.v1 import api_pb2

from bench.stacks import busybox_stack
from bench.timing import p95, timed
from tests.fixtures_events import EventReader
from tests.fixtures_pods import pod_config

EXITS = 15
STARTS = 15
PODS = 110
SCRAPES = 10


def _container(stack, sandbox_id, config, image, command) -> str:  # type: ignore[no-untyped-def]
    reply = stack.runtime.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, sandbox_config=config,
        config=api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="c"), image=api_pb2.ImageSpec(image=image),
                                       command=command)), timeout=120)
    stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=reply.container_id), timeout=60)
    return reply.container_id


def _pod_start(stack, image) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    config = pod_config()

    def start() -> str:
        sandbox_id = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=120).pod_sandbox_id
        _container(stack, sandbox_id, config, image, ["sleep", "3600"])
        return sandbox_id

    return timed(start)


def _remove_pod(stack, sandbox_id: str) -> None:  # type: ignore[no-untyped-def]
    stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)
    stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)


def run() -> dict[str, float | str]:
    figures: dict[str, float | str] = {}
    with busybox_stack() as (stack, image):
        # Event latency.
        reader = EventReader(stack)
        reader.wait_subscribed()
        config = pod_config()
        sandbox_id = stack.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=120).pod_sandbox_id
        latencies = []
        for _ in range(EXITS):
            container_id = _container(stack, sandbox_id, config, image, ["sh", "-c", "sleep 0.2"])
            deadline = time.time() + 30
            while time.time() < deadline:
                stopped = [(at, event) for at, event in reader.events
                           if event.container_id == container_id and event.container_event_type == api_pb2.CONTAINER_STOPPED_EVENT]
                if stopped:
                    at, event = stopped[0]
                    finished = [s for s in event.containers_statuses if s.id == container_id][0].finished_at
                    latencies.append((at - finished / 1e9) * 1000)
                    break
                time.sleep(0.002)
            stack.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id), timeout=60)
        _remove_pod(stack, sandbox_id)
        reader.close()
        figures["event_latency_exit_to_client_ms_median"] = round(statistics.median(latencies), 2)
        figures["event_latency_exit_to_client_ms_p95"] = round(p95(latencies), 2)

        # Cost of events on pod start.
        for label, streams in (("no_stream", 0), ("two_streams", 2)):
            readers = [EventReader(stack) for _ in range(streams)]
            for open_reader in readers:
                open_reader.wait_subscribed()
            times, pods = [], []
            for _ in range(STARTS):
                elapsed, pod = _pod_start(stack, image)
                times.append(elapsed)
                pods.append(pod)
            for pod in pods:
                _remove_pod(stack, pod)
            for open_reader in readers:
                open_reader.close()
            figures[f"pod_start_ms_median_{label}"] = round(statistics.median(times), 1)
            figures[f"pod_start_ms_p95_{label}"] = round(p95(times), 1)

        # Scrapes at 110 pods.
        pods = [_pod_start(stack, image)[1] for _ in range(PODS)]
        url = f"http://127.0.0.1:{stack.metrics_port}/metrics"

        def scrape() -> int:
            with urllib.request.urlopen(url, timeout=30) as reply:
                return len(reply.read())

        scrapes = [timed(scrape) for _ in range(SCRAPES)]
        figures["pods"] = PODS
        figures["metrics_scrape_ms_median"] = round(statistics.median(ms for ms, _ in scrapes), 1)
        figures["metrics_scrape_bytes"] = scrapes[0][1]
        metrics_calls = [timed(lambda: stack.runtime.ListPodSandboxMetrics(
            api_pb2.ListPodSandboxMetricsRequest(), timeout=60))[0] for _ in range(SCRAPES)]
        figures["list_pod_sandbox_metrics_ms_median"] = round(statistics.median(metrics_calls), 1)
        stats_calls = [timed(lambda: stack.runtime.ListPodSandboxStats(
            api_pb2.ListPodSandboxStatsRequest(), timeout=60))[0] for _ in range(SCRAPES)]
        figures["list_pod_sandbox_stats_ms_median"] = round(statistics.median(stats_calls), 1)
        for pod in pods:
            _remove_pod(stack, pod)
    return figures
