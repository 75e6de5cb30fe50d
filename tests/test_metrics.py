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
