"""The real kubelet (EventedPLEG and PodAndContainerStatsFromCRI gates) on a
private stack: static pods start, a crashing container is restarted, a
removed manifest tears its pod down, the kubelet holds pyrio's event stream
open without errors, /stats/summary has the pod's network and
/metrics/cadvisor has series labelled with the pod and container.
Skipped (with the reason) when the kubelet binary is absent."""

from __future__ import annotations

import json
from typing import Iterator

import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_containers import TestImages
from tests.harness import Stack, wait_until
from tests.kubelet_runner import Kubelet

GATES = {"EventedPLEG": True, "PodAndContainerStatsFromCRI": True}


@pytest.fixture
def kubelet(fresh_stack: Stack) -> Iterator[Kubelet]:
    # Never the shared stack: a kubelet removes every pod it does not know.
    own = Kubelet(fresh_stack, GATES)
    try:
        own.start()
        yield own
    finally:
        own.stop()
        print("kubelet log (evented PLEG lines):")
        for line in own.log().splitlines() if own.log_path.exists() else []:
            if "vented" in line or "PLEG" in line:
                print("  ", line[:300])


def static_pod(name: str, image: str, command: list[str]) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
        "spec": {
            "restartPolicy": "Always",
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent", "command": command}],
        },
    }


def containers_of(stack: Stack, pod_name: str) -> list[api_pb2.Container]:
    listed = stack.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    return [item for item in listed if item.labels.get("io.kubernetes.pod.name", "").startswith(pod_name)]


def test_kubelet_drives_static_pods_with_evented_pleg_and_cri_stats(
    kubelet: Kubelet, fresh_stack: Stack, test_images: TestImages
) -> None:
    stack = fresh_stack
    image = test_images.busybox.reference
    web = kubelet.add_manifest("web", static_pod("web", image, ["sh", "-c", "while true; do sleep 1; done"]))
    kubelet.add_manifest("crasher", static_pod("crasher", image, ["sh", "-c", "sleep 1; exit 1"]))

    wait_until(lambda: any(item.state == api_pb2.CONTAINER_RUNNING for item in containers_of(stack, "web")), 180,
               what="the web pod's container running")
    wait_until(lambda: any(item.metadata.attempt >= 1 for item in containers_of(stack, "crasher")), 180,
               what="the crashing container restarted")

    # The kubelet held pyrio's event stream and never had to retry it.
    assert "Evented PLEG: failed to get container events" not in kubelet.log()
    assert "Fall back to Generic PLEG" not in kubelet.log()
    scraped = kubelet.get("/metrics").decode()
    connections = [line for line in scraped.splitlines() if "evented_pleg_conn" in line and not line.startswith("#")]
    print("kubelet evented PLEG series:", connections)
    figures = {line.split()[0]: float(line.split()[1]) for line in connections}
    assert figures.get("kubelet_evented_pleg_connection_success_count", 0) >= 1
    assert figures.get("kubelet_evented_pleg_connection_error_count", 0) == 0

    # /metrics/cadvisor: series labelled with the pod and the container.
    def labelled_series() -> list[str]:
        text = kubelet.get("/metrics/cadvisor").decode()
        return [line for line in text.splitlines()
                if line.startswith("container_memory_working_set_bytes") and 'container="main"' in line
                and 'pod="web' in line]
    series = wait_until(labelled_series, 90, what="labelled cadvisor series of the web pod")
    print("cadvisor:", series[0][:300])

    # A removed manifest tears its pod down.
    web.unlink()
    wait_until(lambda: not containers_of(stack, "web"), 180, what="the web pod's containers removed")
    wait_until(lambda: not [item for item in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
                            if item.metadata.name.startswith("web") and item.state == api_pb2.SANDBOX_READY],
               120, what="the web sandbox stopped")

    # /stats/summary: the pod's network, read through the CRI.
    def crasher_network() -> dict:
        try:
            summary = json.loads(kubelet.get("/stats/summary"))
        except AssertionError as exc:
            if "failed to get rootFs" in str(exc):
                # cadvisor's view of the node's own root filesystem, before any pod is looked at.
                pytest.skip(f"this host fails the kubelet's /stats/summary before pods: {exc}")
            raise
        pods = {pod["podRef"]["name"]: pod for pod in summary.get("pods", [])}
        pod = next((value for key, value in pods.items() if key.startswith("crasher")), None)
        return pod and pod.get("network") and pod["network"].get("interfaces") and pod["network"]
    network = wait_until(crasher_network, 90, what="the crasher pod's network in /stats/summary")
    assert network["name"] == "eth0"
    print("stats/summary network of crasher:", json.dumps(network)[:300])

