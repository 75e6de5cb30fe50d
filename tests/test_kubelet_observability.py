"""The real kubelet (EventedPLEG and PodAndContainerStatsFromCRI gates) on a
private stack: static pods start, a crashing container is restarted, a
removed manifest tears its pod down, the kubelet holds pyrio's event stream
open without errors, /stats/summary has the pod's network (counting traffic
the test sends into the pod's netns) and its container's CPU and memory, and
/metrics/cadvisor has series labelled with the pod and container.
Skipped (with the reason) when the kubelet binary is absent."""

from __future__ import annotations

import json
import socket
from typing import Iterator

import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_containers import TestImages
from tests.harness import Stack, wait_until
from tests.kubelet_runner import Kubelet

TRAFFIC_DATAGRAMS, TRAFFIC_PAYLOAD = 20, 1000
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


def summary_pod(kubelet: Kubelet, pod_name: str) -> dict | None:
    summary = json.loads(kubelet.get("/stats/summary"))
    pod = next((item for item in summary.get("pods", []) if item["podRef"]["name"].startswith(pod_name)), None)
    # The first scrapes after a pod starts may not have its network or its container yet.
    ready = pod and (pod.get("network") or {}).get("interfaces") and pod.get("containers")
    return pod if ready else None


def web_sandbox_ip(stack: Stack) -> str:
    sandboxes = stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    sandbox = next(item for item in sandboxes if item.metadata.name.startswith("web") and item.state == api_pb2.SANDBOX_READY)
    status = stack.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox.id), timeout=10)
    return status.status.network.ip


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

    # /stats/summary, read through the CRI: the web pod's network counts traffic
    # the test sends into the pod's own netns, and its container has CPU and memory.
    before = wait_until(lambda: summary_pod(kubelet, "web"), 90, what="the web pod in /stats/summary")
    assert before["network"]["name"] == "eth0", before["network"]
    assert [item["name"] for item in before["network"]["interfaces"]] == ["eth0"]
    rx_before, tx_before = before["network"]["rxBytes"], before["network"]["txBytes"]
    pod_ip = web_sandbox_ip(stack)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(TRAFFIC_DATAGRAMS):
            # Nothing listens on the discard port: each datagram comes in (rx) and the
            # pod answers with ICMP port unreachable (tx).
            sender.sendto(b"x" * TRAFFIC_PAYLOAD, (pod_ip, 9))

    def after_traffic() -> dict | None:
        pod = summary_pod(kubelet, "web")
        network = pod and pod["network"]
        grew = network and network["rxBytes"] >= rx_before + TRAFFIC_DATAGRAMS * TRAFFIC_PAYLOAD \
            and network["txBytes"] > tx_before
        return pod if grew else None
    after = wait_until(after_traffic, 90, what="the web pod's rx/tx bytes grown by the test's traffic")
    network = after["network"]
    print("stats/summary network of web:", json.dumps(network)[:300])
    assert network["rxBytes"] > 0 and network["txBytes"] > 0
    assert network["rxErrors"] == 0 and network["txErrors"] == 0
    interface = network["interfaces"][0]
    assert interface["name"] == "eth0" and interface["rxBytes"] >= rx_before + TRAFFIC_DATAGRAMS * TRAFFIC_PAYLOAD
    main = next(item for item in after["containers"] if item["name"] == "main")
    print("stats/summary container main of web:", json.dumps({key: main.get(key) for key in ("cpu", "memory")})[:400])
    assert main["cpu"]["usageCoreNanoSeconds"] > 0
    assert main["memory"]["workingSetBytes"] > 0
    assert after["cpu"]["usageCoreNanoSeconds"] >= main["cpu"]["usageCoreNanoSeconds"]
    assert after["memory"]["workingSetBytes"] > 0

    # A removed manifest tears its pod down.
    web.unlink()
    wait_until(lambda: not containers_of(stack, "web"), 180, what="the web pod's containers removed")
    wait_until(lambda: not [item for item in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
                            if item.metadata.name.startswith("web") and item.state == api_pb2.SANDBOX_READY],
               120, what="the web sandbox stopped")
