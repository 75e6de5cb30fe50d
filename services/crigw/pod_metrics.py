"""ListMetricDescriptors / ListPodSandboxMetrics: the cadvisor-compatible
series the kubelet serves at /metrics/cadvisor when it takes stats from the
CRI (PodAndContainerStatsFromCRI).

Figures are those of ListPodSandboxStats (shimd's cgroup and writable-layer
figures, netd's network namespace counters); labels come from the pod and
container metadata, as cadvisor's do: container, id, image, name, namespace,
pod, plus interface or device where a series has one. Values are the CRI's
UInt64, so seconds are whole seconds, as in CRI-O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cri_api.v1 import api_pb2

from services.crigw.gateway import Gateway
from services.crigw.handlers import cri_handler

BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")


@dataclass(frozen=True)
class Series:
    name: str
    help: str
    kind: int
    extra_label: str = ""

    @property
    def label_keys(self) -> list[str]:
        # The CRI asks the runtime to keep keys (and so values) sorted.
        return sorted(BASE_LABELS + ((self.extra_label,) if self.extra_label else ()))


COUNTER, GAUGE = api_pb2.COUNTER, api_pb2.GAUGE
CONTAINER_SERIES = [
    Series("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", COUNTER),
    Series("container_memory_usage_bytes", "Current memory usage in bytes, including all memory regardless of when it was accessed", GAUGE),
    Series("container_memory_working_set_bytes", "Current working set in bytes.", GAUGE),
    Series("container_memory_rss", "Size of RSS in bytes.", GAUGE),
    Series("container_memory_cache", "Number of bytes of page cache memory.", GAUGE),
    Series("container_memory_failures_total", "Cumulative count of memory allocation failures (page faults).", COUNTER, "failure_type"),
    Series("container_oom_events_total", "Count of out of memory events observed for the container", COUNTER),
    Series("container_fs_usage_bytes", "Number of bytes that are consumed by the container on this filesystem.", GAUGE, "device"),
    Series("container_fs_inodes_total", "Number of inodes used by the container on this filesystem.", GAUGE, "device"),
    Series("container_processes", "Number of processes running inside the container.", GAUGE),
    Series("container_start_time_seconds", "Start time of the container since unix epoch in seconds.", GAUGE),
    Series("container_last_seen", "Last time a container was seen by the exporter", GAUGE),
]
POD_SERIES = [
    Series("container_network_receive_bytes_total", "Cumulative count of bytes received", COUNTER, "interface"),
    Series("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted", COUNTER, "interface"),
    Series("container_network_receive_packets_total", "Cumulative count of packets received", COUNTER, "interface"),
    Series("container_network_transmit_packets_total", "Cumulative count of packets transmitted", COUNTER, "interface"),
    Series("container_network_receive_errors_total", "Cumulative count of errors encountered while receiving", COUNTER, "interface"),
    Series("container_network_transmit_errors_total", "Cumulative count of errors encountered while transmitting", COUNTER, "interface"),
]
SERIES = {series.name: series for series in CONTAINER_SERIES + POD_SERIES}


@cri_handler("ListMetricDescriptors")
def list_metric_descriptors(
    gateway: Gateway, request: api_pb2.ListMetricDescriptorsRequest
) -> api_pb2.ListMetricDescriptorsResponse:
    return api_pb2.ListMetricDescriptorsResponse(descriptors=[
        api_pb2.MetricDescriptor(name=series.name, help=series.help, label_keys=series.label_keys)
        for series in SERIES.values()
    ])


def _metric(name: str, labels: dict[str, str], value: float) -> api_pb2.Metric:
    series = SERIES[name]
    return api_pb2.Metric(
        name=name, timestamp=0, metric_type=series.kind,
        label_values=[labels.get(key, "") for key in series.label_keys],
        value=api_pb2.UInt64Value(value=max(0, int(value))),
    )


def _value(item: dict[str, Any], section: str, field: str) -> int | None:
    figure = (item.get(section) or {}).get(field)
    return None if figure is None else int(figure.get("value", 0))


def container_metrics(item: dict[str, Any], pod_labels: dict[str, str], now: float) -> list[api_pb2.Metric]:
    """The series of one container from its shimd stats."""
    attributes = item["attributes"]
    labels = {**pod_labels, "container": attributes["metadata"]["name"], "id": attributes["id"],
              "name": attributes["id"], "image": item.get("image", "")}
    metrics = []
    cpu = _value(item, "cpu", "usage_core_nano_seconds")
    if cpu is not None:
        metrics.append(_metric("container_cpu_usage_seconds_total", labels, cpu // 1_000_000_000))
    memory_series = (("usage_bytes", "container_memory_usage_bytes"), ("working_set_bytes", "container_memory_working_set_bytes"),
                     ("rss_bytes", "container_memory_rss"))
    for field, name in memory_series:
        figure = _value(item, "memory", field)
        if figure is not None:
            metrics.append(_metric(name, labels, figure))
    usage, rss = _value(item, "memory", "usage_bytes"), _value(item, "memory", "rss_bytes")
    if usage is not None and rss is not None:
        # The cgroup's charge beyond anonymous memory: its page cache.
        metrics.append(_metric("container_memory_cache", labels, usage - rss))
    for field, failure_type in (("page_faults", "pgfault"), ("major_page_faults", "pgmajfault")):
        figure = _value(item, "memory", field)
        if figure is not None:
            metrics.append(_metric("container_memory_failures_total", {**labels, "failure_type": failure_type}, figure))
    if "oom_kills" in item:
        metrics.append(_metric("container_oom_events_total", labels, item["oom_kills"]))
    layer = item.get("writable_layer")
    if layer:
        device = {**labels, "device": layer.get("fs_id", {}).get("mountpoint", "")}
        metrics.append(_metric("container_fs_usage_bytes", device, layer["used_bytes"]["value"]))
        metrics.append(_metric("container_fs_inodes_total", device, layer["inodes_used"]["value"]))
    if "process_count" in item:
        metrics.append(_metric("container_processes", labels, item["process_count"]))
    if item.get("started_at"):
        metrics.append(_metric("container_start_time_seconds", labels, item["started_at"] // 1_000_000_000))
    metrics.append(_metric("container_last_seen", labels, now))
    return metrics


def pod_network_metrics(sandbox_id: str, network: dict[str, Any], pod_labels: dict[str, str]) -> list[api_pb2.Metric]:
    labels = {**pod_labels, "id": sandbox_id, "name": sandbox_id}
    metrics = []
    for interface in network.get("interfaces") or []:
        per = {**labels, "interface": interface["name"]}
        for field, name in (("rx_bytes", "container_network_receive_bytes_total"),
                            ("tx_bytes", "container_network_transmit_bytes_total"),
                            ("rx_errors", "container_network_receive_errors_total"),
                            ("tx_errors", "container_network_transmit_errors_total")):
            metrics.append(_metric(name, per, interface[field]["value"]))
        for field, name in (("rx_packets", "container_network_receive_packets_total"),
                            ("tx_packets", "container_network_transmit_packets_total")):
            if field in interface:
                metrics.append(_metric(name, per, interface[field]))
    return metrics


@cri_handler("ListPodSandboxMetrics")
def list_pod_sandbox_metrics(
    gateway: Gateway, request: api_pb2.ListPodSandboxMetricsRequest
) -> api_pb2.ListPodSandboxMetricsResponse:
    sandboxes = [record for record in gateway.netd.call("sandbox.list", {"filter": {}}, idempotent=True)
                 if record.get("state") == "ready"]
    stats = gateway.shimd.call("container.list_stats", {"filter": {}}, idempotent=True)
    networks = gateway.netd.call("sandbox.network_stats", {"sandbox_ids": [record["id"] for record in sandboxes]},
                                 idempotent=True) if sandboxes else {}
    by_sandbox: dict[str, list[dict[str, Any]]] = {}
    for item in stats:
        by_sandbox.setdefault(item.get("pod_sandbox_id", ""), []).append(item)
    now = time.time()
    pods = []
    for record in sandboxes:
        metadata = record["metadata"]
        pod_labels = {"namespace": metadata.get("namespace", ""), "pod": metadata.get("name", "")}
        network = networks.get(record["id"])
        pods.append(api_pb2.PodSandboxMetrics(
            pod_sandbox_id=record["id"],
            metrics=pod_network_metrics(record["id"], network, pod_labels) if network else [],
            container_metrics=[
                api_pb2.ContainerMetrics(container_id=item["attributes"]["id"],
                                         metrics=container_metrics(item, pod_labels, now))
                for item in by_sandbox.get(record["id"], [])
            ],
        ))
    return api_pb2.ListPodSandboxMetricsResponse(pod_metrics=pods)
