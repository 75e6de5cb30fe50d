"""ListMetricDescriptors / ListPodSandboxMetrics through the socket: the
cadvisor-compatible series, labelled from the pod's and container's metadata,
with the pod's network from its namespace."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from tests.fixtures_containers import Containers, wait_for_log
from tests.fixtures_pods import BUSYBOX, in_netns, sandbox_info

WANTED = {
    "container_cpu_usage_seconds_total", "container_memory_working_set_bytes", "container_memory_rss",
    "container_memory_cache", "container_memory_usage_bytes", "container_network_receive_bytes_total",
    "container_network_transmit_bytes_total", "container_network_receive_packets_total",
    "container_network_transmit_packets_total", "container_fs_usage_bytes", "container_oom_events_total",
}


def test_descriptors_and_labelled_pod_metrics(containers: Containers) -> None:
    descriptors = {item.name: item for item in containers.runtime.ListMetricDescriptors(
        api_pb2.ListMetricDescriptorsRequest(), timeout=10).descriptors}
    assert WANTED <= set(descriptors)
    for descriptor in descriptors.values():
        assert list(descriptor.label_keys) == sorted(descriptor.label_keys)
        assert {"container", "namespace", "pod"} <= set(descriptor.label_keys)
    assert "interface" in descriptors["container_network_receive_bytes_total"].label_keys

    pod = containers.pod()
    sandbox_id, config = pod
    container_id = containers.run(pod, "worker", command=["sh", "-c", "echo up; while true; do :; done"])
    wait_for_log(containers, container_id, "up")
    netns = sandbox_info(containers.stack, sandbox_id)["namespaces"]["network"]
    gateway_ip = containers.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id), timeout=10).status.network.ip.rsplit(".", 1)[0] + ".1"
    in_netns(netns, BUSYBOX, "ping", "-c", "3", "-i", "0.05", gateway_ip, timeout=30, check=False)

    reply = containers.runtime.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest(), timeout=20)
    pods = {item.pod_sandbox_id: item for item in reply.pod_metrics}
    ours = pods[sandbox_id]

    def labelled(metric: api_pb2.Metric) -> dict[str, str]:
        keys = list(descriptors[metric.name].label_keys)
        assert len(keys) == len(metric.label_values), metric.name
        return dict(zip(keys, metric.label_values))

    [container] = ours.container_metrics
    assert container.container_id == container_id
    by_name = {metric.name: metric for metric in container.metrics}
    for name in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                 "container_memory_rss", "container_memory_cache", "container_oom_events_total"):
        assert name in by_name, name
    labels = labelled(by_name["container_memory_working_set_bytes"])
    assert labels["pod"] == config.metadata.name and labels["namespace"] == config.metadata.namespace
    assert labels["container"] == "worker" and labels["id"] == container_id
    assert labels["image"] == containers.images.busybox.reference
    assert by_name["container_memory_working_set_bytes"].value.value > 0
    assert by_name["container_memory_working_set_bytes"].metric_type == api_pb2.GAUGE
    assert by_name["container_cpu_usage_seconds_total"].metric_type == api_pb2.COUNTER

    network = [metric for metric in ours.metrics if metric.name == "container_network_transmit_packets_total"]
    assert network, "no pod network series"
    eth0 = [metric for metric in network if labelled(metric)["interface"] == "eth0"]
    assert eth0 and eth0[0].value.value >= 3
    assert labelled(eth0[0])["pod"] == config.metadata.name
