"""Timing helpers the benchmarks share."""

from __future__ import annotations

import time
from typing import Any, Callable


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds the call took, its value)."""
    started = time.perf_counter()
    value = call()
    return (time.perf_counter() - started) * 1000, value


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
