"""crigw's Prometheus endpoint (`[metrics]`: http(s)://127.0.0.1:9090/metrics).

crigw serves it because it is the one process that sees every CRI call;
the daemons' figures are asked for at each scrape over the RPC layer (their
`metrics` method, common/daemon.py), in parallel and briefly, so a daemon
that is down shows as `pyrio_service_up 0` instead of failing the scrape.

Daemons count from zero at each start; crigw adds what a daemon had counted
before it restarted (`MonotonicCounters`), so within crigw's life no
counter goes backwards, and it resets only when crigw restarts, as
Prometheus expects of a counter. Restarts come from each service's `starts`
file and so never reset.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from common.config import SERVICES
from common.daemon import service_starts
from common.errors import PyrioError
from services.crigw.events import open_streams
from services.crigw.gateway import Gateway
from services.crigw.handlers import HANDLERS
from services.crigw.metrics_http import MetricsServer
from services.crigw.prometheus_text import (
    Counter,
    CounterMetricFamily,
    GaugeMetricFamily,
    Histogram,
    MetricFamily,
    Registry,
)
from services.crigw.status import CALL_OBSERVERS

log = logging.getLogger("pyrio.crigw.metrics")

DAEMON_METRICS_TIMEOUT_SECONDS = 1.0
# CRI calls take from microseconds (Version) to minutes (PullImage, StopContainer).
CRI_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PULL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REGISTRY = Registry()
CRI_OPERATIONS = Counter("pyrio_cri_operations", "CRI calls served, by method and gRPC code",
                         ["operation", "code"], registry=REGISTRY)
CRI_LATENCY = Histogram("pyrio_cri_operations_duration_seconds", "CRI call latency, by method",
                        ["operation"], buckets=CRI_BUCKETS, registry=REGISTRY)
IMAGE_PULLS = Counter("pyrio_image_pulls", "PullImage calls, by outcome (success, failure)",
                      ["outcome"], registry=REGISTRY)
IMAGE_PULL_FAILURES = Counter("pyrio_image_pull_failures", "failed PullImage calls, by gRPC code",
                              ["reason"], registry=REGISTRY)
IMAGE_PULL_SECONDS = Histogram("pyrio_image_pull_duration_seconds", "PullImage duration",
                               buckets=PULL_BUCKETS, registry=REGISTRY)
IMAGE_PULL_BYTES = Counter("pyrio_image_pull_bytes", "size of the images pulled (bytes)", registry=REGISTRY)


class RecentErrors:
    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self._times.append(time.monotonic())

    def count(self) -> int:
        with self._lock:
            now = time.monotonic()
            while self._times and now - self._times[0] > self.seconds:
                self._times.popleft()
            return len(self._times)


CRI_ERRORS = RecentErrors()


def observe_cri_call(method: str, code: str, seconds: float) -> None:
    CRI_OPERATIONS.labels(method, code).inc()
    CRI_LATENCY.labels(method).observe(seconds)
    if code != "OK":
        CRI_ERRORS.add()
    if method == "PullImage":
        IMAGE_PULLS.labels("success" if code == "OK" else "failure").inc()
        IMAGE_PULL_SECONDS.observe(seconds)
        if code != "OK":
            IMAGE_PULL_FAILURES.labels(code).inc()


class MonotonicCounters:
    """Counters a daemon restarts from zero, made monotonic within crigw.

    `update(service, epoch, values)`: `values` are the daemon's counts since
    its start `epoch`; a new epoch adds the previous one's last counts to the
    base. A daemon that is down keeps reporting its last totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epochs: dict[str, Any] = {}
        self._base: dict[str, dict[tuple, float]] = {}
        self._last: dict[str, dict[tuple, float]] = {}

    def update(self, service: str, epoch: Any, values: dict[tuple, float]) -> None:
        with self._lock:
            base = self._base.setdefault(service, {})
            last = self._last.setdefault(service, {})
            restarted = self._epochs.get(service, epoch) != epoch or any(
                values.get(key, 0) < count for key, count in last.items())
            if restarted:
                for key, count in last.items():
                    base[key] = base.get(key, 0) + count
                last.clear()
            self._epochs[service] = epoch
            last.update(values)

    def totals(self, service: str) -> dict[tuple, float]:
        with self._lock:
            base, last = self._base.get(service, {}), self._last.get(service, {})
            return {key: base.get(key, 0) + last.get(key, 0) for key in set(base) | set(last)}


class ServiceCollector:
    """The figures of every service, asked for at each scrape."""

    def __init__(self, gateway: Gateway, started_at: float, in_flight: Any) -> None:
        self.gateway = gateway
        self.started_at = started_at
        self.in_flight = in_flight
        self.counters = MonotonicCounters()
        self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="metrics")
        self.last_shimd: dict[str, Any] = {}

    def _ask(self, client: Any) -> dict[str, Any] | None:
        try:
            return client.call("metrics", timeout=DAEMON_METRICS_TIMEOUT_SECONDS, idempotent=True)
        except PyrioError:
            return None

    def collect(self) -> Iterable[MetricFamily]:
        clients = [self.gateway.imaged, self.gateway.netd, self.gateway.shimd]
        answers = dict(zip((client.service for client in clients), self._pool.map(self._ask, clients)))
        now = time.time()
        up = GaugeMetricFamily("pyrio_service_up", "1 when the service answers, 0 when it is down", labels=["service"])
        uptime = GaugeMetricFamily("pyrio_service_uptime_seconds", "seconds since the service started",
                                   labels=["service"])
        restarts = CounterMetricFamily("pyrio_service_restarts", "starts of the service after its first",
                                       labels=["service"])
        in_flight = GaugeMetricFamily("pyrio_service_calls_in_flight", "calls being served", labels=["service"])
        recent = GaugeMetricFamily("pyrio_service_errors_last_minute", "calls that failed in the last minute",
                                   labels=["service"])
        rpc = CounterMetricFamily("pyrio_rpc_calls", "RPC calls served between services, by method and error kind",
                                  labels=["service", "method", "error"])
        for service in SERVICES:
            restarts.add_metric([service], max(0, service_starts(self.gateway.config, service) - 1))
            if service == "crigw":
                up.add_metric([service], 1)
                uptime.add_metric([service], now - self.started_at)
                # Not the event streams: they stay open for good.
                in_flight.add_metric([service], max(0, self.in_flight.count - open_streams(self.gateway)))
                recent.add_metric([service], CRI_ERRORS.count())
                continue
            answer = answers.get(service)
            up.add_metric([service], 0 if answer is None else 1)
            if answer is not None:
                uptime.add_metric([service], now - float(answer["started_at"]))
                in_flight.add_metric([service], answer["in_flight"])
                recent.add_metric([service], answer["errors_last_minute"])
                self.counters.update(f"rpc:{service}", (answer["pid"], answer["started_at"]),
                                     {(method, kind): count for method, kind, count in answer["calls"]})
            for (method, kind), count in sorted(self.counters.totals(f"rpc:{service}").items()):
                rpc.add_metric([service, method, kind], count)
        yield from (up, uptime, restarts, in_flight, recent, rpc)
        yield from self._shimd_figures(answers.get("shimd"))

    def _shimd_figures(self, answer: dict[str, Any] | None) -> Iterable[MetricFamily]:
        exits = CounterMetricFamily("pyrio_container_exits", "container exits, by exit code class (zero, error, signal)",
                                    labels=["code_class"])
        ooms = CounterMetricFamily("pyrio_container_oom_events", "containers killed by the OOM killer")
        shims = GaugeMetricFamily("pyrio_running_shims", "shims running (one per created or running container)")
        if answer is not None:
            figures = answer.get("service_figures") or {}
            values: dict[tuple, float] = {("exit", code_class): count
                                          for code_class, count in (figures.get("exits") or {}).items()}
            values[("oom",)] = figures.get("oom_kills", 0)
            self.counters.update("shimd", (answer["pid"], answer["started_at"]), values)
            self.last_shimd = figures
        totals = self.counters.totals("shimd")
        for key, count in sorted(totals.items()):
            if key[0] == "exit":
                exits.add_metric([key[1]], count)
        ooms.add_metric([], totals.get(("oom",), 0))
        yield exits
        yield ooms
        if answer is not None:
            shims.add_metric([], self.last_shimd.get("running_shims", 0))
            yield shims


def _count_pulled_bytes(gateway: Gateway) -> None:
    """Wrap PullImage so a success adds the image's size to the bytes pulled."""
    from services.crigw.server import load_handler_modules

    load_handler_modules()
    pull = HANDLERS.get("PullImage")
    if pull is None or getattr(pull, "counts_bytes", False):
        return

    def counted(gateway_: Gateway, request: Any) -> Any:
        response = pull(gateway_, request)
        try:
            answer = gateway_.imaged.call("image.status", {"image": response.image_ref}, timeout=2.0, idempotent=True)
            IMAGE_PULL_BYTES.inc(int(((answer or {}).get("image") or {}).get("size", 0)))
        except PyrioError:
            pass
        return response

    counted.counts_bytes = True  # type: ignore[attr-defined]
    HANDLERS["PullImage"] = counted


def start_metrics_server(gateway: Gateway, in_flight: Any) -> MetricsServer | None:
    """Serve /metrics as `[metrics]` says; None when disabled or the port is taken
    (the CRI is served either way; the error is logged)."""
    settings = gateway.config.metrics
    if observe_cri_call not in CALL_OBSERVERS:
        CALL_OBSERVERS.append(observe_cri_call)
    _count_pulled_bytes(gateway)
    if not settings.enable:
        return None
    try:
        server = MetricsServer(settings.address, settings.port, REGISTRY.exposition,
                               certfile=settings.tls_cert_file or None, keyfile=settings.tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot serve metrics", extra={"address": settings.address, "port": settings.port, "error": str(exc)})
        return None
    REGISTRY.register(ServiceCollector(gateway, time.time(), in_flight))
    server.start()
    log.info("serving metrics", extra={"address": settings.address, "port": server.server_port,
                                       "tls": bool(settings.tls_cert_file)})
    return server
