"""crigw's Prometheus endpoint, scraped over HTTP on the stack's own port:
the series an operator reads, a service being down shown in them (the
scrape still answers), and counters that never go backwards when a daemon
restarts."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from cri_api.v1 import api_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_containers import Containers
from tests.fixtures_faults import kill_service, wait_all_running, wait_restarted
from tests.harness import Stack, wait_until


def scrape(stack: Stack) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_cri_calls_pulls_exits_and_services_are_series(containers: Containers) -> None:
    stack = containers.stack
    before = scrape(stack)
    containers.runtime.Version(api_pb2.VersionRequest(), timeout=10)
    with pytest.raises(grpc.RpcError):
        containers.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="0" * 64), timeout=10)
    with pytest.raises(grpc.RpcError):
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="127.0.0.1:1/nothing:here")),
                               timeout=60)
    container_id = containers.run(command=["sh", "-c", "exit 3"])
    containers.wait_exited(container_id)

    def exit_counted() -> dict:
        now = scrape(stack)
        return now if value(now, "pyrio_container_exits_total", code_class="error") > \
            value(before, "pyrio_container_exits_total", code_class="error") else {}

    after = wait_until(exit_counted, 20, what="the exit counted")
    assert value(after, "pyrio_cri_operations_total", operation="Version", code="OK") > \
        value(before, "pyrio_cri_operations_total", operation="Version", code="OK")
    assert value(after, "pyrio_cri_operations_total", operation="ContainerStatus", code="NOT_FOUND") >= 1
    assert value(after, "pyrio_cri_operations_duration_seconds_count", operation="Version") >= 1
    assert value(after, "pyrio_image_pulls_total", outcome="failure") >= 1
    assert sum(v for (name, _), v in after.items() if name == "pyrio_image_pull_failures_total") >= 1
    assert value(after, "pyrio_image_pull_bytes_total") > 0  # the test image pulled by containers.run
    assert value(after, "pyrio_running_shims") >= 0
    for service in ("crigw", "imaged", "netd", "shimd"):
        assert value(after, "pyrio_service_up", service=service) == 1
        assert value(after, "pyrio_service_uptime_seconds", service=service) > 0
        assert ("pyrio_service_restarts_total", (("service", service),)) in after
    assert value(after, "pyrio_rpc_calls_total", service="shimd", method="container.create", error="") >= 1
    assert value(after, "pyrio_rpc_calls_total", service="shimd", method="container.status", error="NotFound") >= 1


def test_a_daemon_down_shows_in_the_series_and_counters_do_not_go_back(fault_containers: Containers) -> None:
    stack = fault_containers.stack
    fault_containers.run(command=["sleep", "60"])
    before = scrape(stack)
    created = value(before, "pyrio_rpc_calls_total", service="shimd", method="container.create", error="")
    assert created >= 1
    restarts = value(before, "pyrio_service_restarts_total", service="shimd")

    stack.supervisorctl("stop", "shimd")
    down = scrape(stack)
    assert value(down, "pyrio_service_up", service="shimd") == 0
    assert value(down, "pyrio_service_up", service="netd") == 1
    assert value(down, "pyrio_rpc_calls_total", service="shimd", method="container.create", error="") == created

    stack.supervisorctl("start", "shimd")
    wait_all_running(stack)
    old = kill_service(stack, "shimd")
    wait_restarted(stack, "shimd", old)
    wait_all_running(stack)
    after = scrape(stack)
    assert value(after, "pyrio_service_up", service="shimd") == 1
    # Its counts since the restart start again at zero; the exported total does not.
    assert value(after, "pyrio_rpc_calls_total", service="shimd", method="container.create", error="") >= created
    assert value(after, "pyrio_service_restarts_total", service="shimd") == restarts + 2


def test_pyrio_status_shows_uptime_restarts_in_flight_and_recent_errors(stack: Stack) -> None:
    import subprocess
    import sys
    from pathlib import Path

    with pytest.raises(grpc.RpcError):
        stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="f" * 64), timeout=10)
    result = subprocess.run(
        [sys.executable, "-m", "pyrio", "--config", str(stack.config_path), "status"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    for service in ("crigw", "imaged", "netd", "shimd"):
        fields = dict(part.split("=", 1) for part in lines[service].split() if "=" in part)
        assert fields["uptime"] != "-", lines[service]
        assert int(fields["restarts"]) >= 0 and int(fields["in_flight"]) >= 0, lines[service]
    errors = {service: int(dict(p.split("=", 1) for p in lines[service].split() if "=" in p)["errors_1m"])
              for service in ("crigw", "shimd")}
    assert errors["crigw"] >= 1 and errors["shimd"] >= 1  # the NOT_FOUND above, seen by both


def test_pyrio_status_reads_crigws_own_figures_from_its_metrics(stack: Stack) -> None:
    from common.config import load_config
    from pyrio.cli import gateway_figures

    figures = gateway_figures(load_config(str(stack.config_path)))
    assert set(figures) == {"uptime", "restarts", "in_flight", "errors_1m"}, figures
    assert figures["uptime"] > 0 and figures["restarts"] >= 0 and figures["in_flight"] >= 0


def test_metrics_over_tls_when_a_certificate_is_configured(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import ssl
    import subprocess

    cert, key = tmp_path / "metrics.crt", tmp_path / "metrics.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    stack = Stack({"metrics": {"tls_cert_file": str(cert), "tls_key_file": str(key)}})
    try:
        stack.start()
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        with urllib.request.urlopen(f"https://127.0.0.1:{stack.metrics_port}/metrics", timeout=10, context=context) as reply:
            assert b"pyrio_service_up" in reply.read()
        with pytest.raises(OSError):  # no plain HTTP on that port
            urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).read()
    finally:
        stack.stop()


def test_a_taken_metrics_port_is_logged_and_the_cri_served_anyway() -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        stack = Stack({"metrics": {"port": port}})
        try:
            stack.start()
            assert stack.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name
            assert "cannot serve metrics" in stack.logs("crigw")
        finally:
            stack.stop()


# --- the text format, without a stack -------------------------------------------------------------
# prometheus_client (a test dependency) is the independent check: its parser reads what
# services/crigw/prometheus_text.py writes, and for the same metrics its own writer gives the same bytes.

def parsed(text: str) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_exposition_is_prometheus_clients_byte_for_byte() -> None:
    import prometheus_client
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily as LibraryCounterFamily
    from prometheus_client.core import GaugeMetricFamily as LibraryGaugeFamily

    from services.crigw import prometheus_text as ours
    from services.crigw.metrics import CRI_BUCKETS, PULL_BUCKETS

    def fill(lib: object, registry: object, counter_family: object, gauge_family: object) -> None:
        operations = lib.Counter("t_operations", "calls, by \\ method\nand code", ["operation", "code"], registry=registry)
        latency = lib.Histogram("t_duration_seconds", "latency", ["operation"], buckets=CRI_BUCKETS, registry=registry)
        pulls = lib.Histogram("t_pull_seconds", "pulls", buckets=PULL_BUCKETS, registry=registry)
        pulled = lib.Counter("t_pulled_bytes", "bytes", registry=registry)
        lib.Counter("t_unused", "labelled, never used", ["x"], registry=registry)
        operations.labels("Version", "OK").inc()
        operations.labels('a"quote', "back\\slash\nnewline").inc(2.5)
        operations.labels("Version", "OK").inc()
        for seconds in (0.0001, 0.0005, 0.003, 0.7, 59.9, 1000.0):
            latency.labels("PullImage").observe(seconds)
        latency.labels("Version").observe(0.002)
        pulls.observe(42.0)
        pulled.inc(1_700_000_000)

        class Families:
            def collect(self):  # type: ignore[no-untyped-def]
                up = gauge_family("t_up", "1 when up", labels=["service"])
                up.add_metric(["crigw"], 1)
                up.add_metric(["shimd"], 0)
                restarts = counter_family("t_restarts", "restarts", labels=["service"])
                restarts.add_metric(["netd"], 3)
                ooms = counter_family("t_ooms", "no labels")
                ooms.add_metric([], 0)
                yield from (up, restarts, ooms)

        registry.register(Families())

    library_registry = CollectorRegistry(auto_describe=True)
    fill(prometheus_client, library_registry, LibraryCounterFamily, LibraryGaugeFamily)
    our_registry = ours.Registry()
    fill(ours, our_registry, ours.CounterMetricFamily, ours.GaugeMetricFamily)
    prometheus_client.disable_created_metrics()  # the one difference: crigw writes no _created series
    try:
        expected = prometheus_client.generate_latest(library_registry)
    finally:
        prometheus_client.enable_created_metrics()
    assert our_registry.exposition().decode() == expected.decode()


def test_label_values_with_backslash_quote_and_newline_read_back_as_written() -> None:
    from services.crigw.prometheus_text import Counter, Registry

    registry = Registry()
    counter = Counter("t_escaped", "help with a \\ and a\nline feed", ["value"], registry=registry)
    awkward = ['back\\slash', 'double"quote', 'line\nfeed', '\\"\n', 'plain', '{},=']
    for index, text in enumerate(awkward):
        counter.labels(text).inc(index + 1)
    text = registry.exposition().decode()
    assert "# HELP t_escaped_total help with a \\\\ and a\\nline feed\n" in text
    samples = parsed(text)
    assert {labels[0][1]: v for (_, labels), v in samples.items()} == {t: i + 1.0 for i, t in enumerate(awkward)}
    family = next(text_string_to_metric_families(text))
    assert (family.name, family.type, family.documentation) == ("t_escaped", "counter", "help with a \\ and a\nline feed")


def test_histogram_buckets_are_cumulative_and_end_at_inf_with_the_count() -> None:
    from services.crigw.prometheus_text import Histogram, Registry

    registry = Registry()
    histogram = Histogram("t_seconds", "latency", ["op"], buckets=(0.1, 1, 10), registry=registry)
    for seconds in (0.05, 0.1, 0.5, 5, 50, 500):
        histogram.labels("x").observe(seconds)
    histogram.labels("idle")  # a series at zero from its first labels(...)
    text = registry.exposition().decode()
    samples = parsed(text)
    buckets = {le: samples[("t_seconds_bucket", (("le", le), ("op", "x")))] for le in ("0.1", "1.0", "10.0", "+Inf")}
    assert buckets == {"0.1": 2, "1.0": 3, "10.0": 4, "+Inf": 6}
    assert samples[("t_seconds_count", (("op", "x"),))] == 6
    assert samples[("t_seconds_sum", (("op", "x"),))] == pytest.approx(555.65)
    assert samples[("t_seconds_bucket", (("le", "+Inf"), ("op", "idle")))] == 0
    assert next(text_string_to_metric_families(text)).type == "histogram"
    with pytest.raises(ValueError):
        Histogram("t_unsorted", "x", buckets=(1, 0.5))


def test_counters_only_go_up() -> None:
    from services.crigw.prometheus_text import Counter, Registry

    registry = Registry()
    counter = Counter("t_calls", "calls", registry=registry)
    seen = []
    for amount in (0, 1, 2.5, 0, 10):
        counter.inc(amount)
        seen.append(parsed(registry.exposition().decode())[("t_calls_total", ())])
    assert seen == sorted(seen) and seen[-1] == 13.5
    with pytest.raises(ValueError):
        counter.inc(-1)
    assert parsed(registry.exposition().decode())[("t_calls_total", ())] == 13.5
    labelled = Counter("t_labelled", "x", ["a"], registry=registry)
    with pytest.raises(ValueError):
        labelled.labels("one", "two")  # one label, two values
    with pytest.raises(ValueError):
        labelled.inc()


def test_the_http_listener_serves_get_metrics_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket
    import urllib.error

    from services.crigw.metrics_http import MetricsServer
    from services.crigw.prometheus_text import CONTENT_TYPE

    server = MetricsServer("127.0.0.1", 0, lambda: b"# HELP x_total x\n# TYPE x_total counter\nx_total 1.0\n").start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(f"{base}/metrics?name[]=x", timeout=10) as reply:
            assert reply.headers["Content-Type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
            assert parsed(reply.read().decode()) == {("x_total", ()): 1.0}
        for path, method, code in (("/", "GET", 404), ("/other", "GET", 404), ("/metrics", "POST", 405)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None),
                                       timeout=10)
            assert refused.value.code == code, (path, method)
        with pytest.raises(OSError):  # the port is taken: crigw logs that and serves the CRI anyway
            MetricsServer("127.0.0.1", server.server_port, lambda: b"")
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as raw:
            raw.sendall(b"nonsense\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 400 ")
    finally:
        server.stop()
