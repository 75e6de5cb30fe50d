"""The few Prometheus metric kinds crigw exports, in the text format 0.0.4.

Hand-written instead of prometheus_client because that library, for what
crigw uses of it, cost crigw about 2.6 MiB of anonymous memory at start
(issue 14: every daemon's idle memory counts): importing it loads
urllib.request, wsgiref, http.server, email, gzip, its push gateway,
multiprocess and OpenMetrics code, none of which crigw needs.

The output is what prometheus_client 0.26 writes for the same metrics
(tests/test_metrics.py compares them byte for byte), less the
`_created` series, which no consumer of crigw's endpoint reads: counters are
exposed as `<name>_total` (HELP and TYPE lines included), histograms as
cumulative `_bucket{le=...}` ending at `+Inf`, then `_count` and `_sum`;
labels are sorted by name and their values escaped (backslash, double
quote, line feed).
"""

from __future__ import annotations

import math
import threading
from typing import Iterable, Protocol, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
INF = float("inf")

Labels = tuple[tuple[str, str], ...]


class MetricFamily:
    """One metric's HELP/TYPE and its samples, as a collector yields them at a scrape."""

    def __init__(self, name: str, documentation: str, kind: str, labels: Sequence[str] = ()) -> None:
        if kind == "counter" and name.endswith("_total"):
            name = name[: -len("_total")]
        self.name = name
        self.documentation = documentation
        self.kind = kind
        self.labelnames = tuple(labels)
        # (sample name, labels, value)
        self.samples: list[tuple[str, Labels, float]] = []

    @property
    def exposed_name(self) -> str:
        return f"{self.name}_total" if self.kind == "counter" else self.name

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        """A counter's or a gauge's value for one set of label values."""
        self.add_sample(self.exposed_name, _pairs(self.labelnames, labels), value)

    def add_sample(self, name: str, labels: Labels, value: float) -> None:
        self.samples.append((name, labels, float(value)))


def CounterMetricFamily(name: str, documentation: str, labels: Sequence[str] = ()) -> MetricFamily:  # noqa: N802
    return MetricFamily(name, documentation, "counter", labels)


def GaugeMetricFamily(name: str, documentation: str, labels: Sequence[str] = ()) -> MetricFamily:  # noqa: N802
    return MetricFamily(name, documentation, "gauge", labels)


class Collector(Protocol):
    def collect(self) -> Iterable[MetricFamily]: ...


class Registry:
    """The collectors of one endpoint, read in the order they were registered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        with self._lock:
            self._collectors.append(collector)

    def collect(self) -> Iterable[MetricFamily]:
        with self._lock:
            collectors = list(self._collectors)
        for collector in collectors:
            yield from collector.collect()

    def exposition(self) -> bytes:
        return exposition(self.collect()).encode("utf-8")


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class Counter:
    """A counter, with label values chosen at each `labels(...)` call, or none."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: Registry | None = None) -> None:
        self._family = CounterMetricFamily(name, documentation, labelnames)
        self._lock = threading.Lock()
        # label values -> child, in the order first seen (as prometheus_client lists them)
        self._children: dict[tuple[str, ...], _Child] = {} if labelnames else {(): _Child()}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> "_CounterChild":
        return _CounterChild(self, _label_values(self._family.labelnames, values))

    def inc(self, amount: float = 1.0) -> None:
        if self._family.labelnames:
            raise ValueError(f"{self._family.name} has labels: inc() through labels(...)")
        self._inc((), amount)

    def _inc(self, key: tuple[str, ...], amount: float) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = _Child()
            child.value += amount

    def collect(self) -> Iterable[MetricFamily]:
        family = CounterMetricFamily(self._family.name, self._family.documentation, self._family.labelnames)
        with self._lock:
            for key, child in self._children.items():
                family.add_metric(key, child.value)
        yield family


class _CounterChild:
    __slots__ = ("_counter", "_key")

    def __init__(self, counter: Counter, key: tuple[str, ...]) -> None:
        self._counter = counter
        self._key = key
        counter._inc(key, 0)  # a series exists (at 0) from its first labels(...)

    def inc(self, amount: float = 1.0) -> None:
        self._counter._inc(self._key, amount)


class _HistogramChild:
    __slots__ = ("counts", "sum")

    def __init__(self, bucket_count: int) -> None:
        self.counts = [0.0] * bucket_count  # per bucket, not cumulative
        self.sum = 0.0


class Histogram:
    """Observations counted into fixed buckets (the last one +Inf), with a sum."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = (), registry: Registry | None = None) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds != sorted(bounds):
            raise ValueError("histogram buckets must be in increasing order")
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self.bounds = tuple(bounds)
        self._labels = tuple(_format_float(bound) for bound in bounds)
        self._family = MetricFamily(name, documentation, "histogram", labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], _HistogramChild] = {} if labelnames else {(): _HistogramChild(len(bounds))}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> "_HistogramLabelled":
        return _HistogramLabelled(self, _label_values(self._family.labelnames, values))

    def observe(self, amount: float) -> None:
        if self._family.labelnames:
            raise ValueError(f"{self._family.name} has labels: observe() through labels(...)")
        self._observe((), amount)

    def _child(self, key: tuple[str, ...]) -> _HistogramChild:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _HistogramChild(len(self.bounds))
        return child

    def _observe(self, key: tuple[str, ...], amount: float) -> None:
        with self._lock:
            child = self._child(key)
            child.sum += amount
            for index, bound in enumerate(self.bounds):
                if amount <= bound:
                    child.counts[index] += 1
                    break

    def collect(self) -> Iterable[MetricFamily]:
        family = MetricFamily(self._family.name, self._family.documentation, "histogram", self._family.labelnames)
        name = family.name
        with self._lock:
            for key, child in self._children.items():
                labels = _pairs(family.labelnames, key)
                cumulative = 0.0
                for le, count in zip(self._labels, child.counts):
                    cumulative += count
                    family.add_sample(f"{name}_bucket", labels + (("le", le),), cumulative)
                family.add_sample(f"{name}_count", labels, cumulative)
                if self.bounds[0] >= 0:  # as prometheus_client: a sum only when no bucket is negative
                    family.add_sample(f"{name}_sum", labels, child.sum)
        yield family


class _HistogramLabelled:
    __slots__ = ("_histogram", "_key")

    def __init__(self, histogram: Histogram, key: tuple[str, ...]) -> None:
        self._histogram = histogram
        self._key = key
        with histogram._lock:
            histogram._child(key)

    def observe(self, amount: float) -> None:
        self._histogram._observe(self._key, amount)


def exposition(families: Iterable[MetricFamily]) -> str:
    """The text format 0.0.4 of these families."""
    lines: list[str] = []
    for family in families:
        name = family.exposed_name
        lines.append(f"# HELP {name} {escape_help(family.documentation)}\n")
        lines.append(f"# TYPE {name} {family.kind}\n")
        for sample_name, labels, value in family.samples:
            if labels:
                pairs = ",".join(f'{key}="{escape_label_value(text)}"' for key, text in sorted(labels))
                lines.append(f"{sample_name}{{{pairs}}} {_format_float(value)}\n")
            else:
                lines.append(f"{sample_name} {_format_float(value)}\n")
    return "".join(lines)


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def escape_label_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _format_float(value: float) -> str:
    """Go's float formatting as Prometheus reads it (prometheus_client's floatToGoString)."""
    if value == INF:
        return "+Inf"
    if value == -INF:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    dot = text.find(".")
    # Go switches to an exponent sooner than Python for large numbers.
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_values(labelnames: tuple[str, ...], values: Sequence[str]) -> tuple[str, ...]:
    if len(values) != len(labelnames):
        raise ValueError(f"expected label values for {labelnames}, got {tuple(values)}")
    return tuple(str(value) for value in values)


def _pairs(labelnames: tuple[str, ...], values: Sequence[str]) -> Labels:
    return tuple(zip(labelnames, _label_values(labelnames, values)))
