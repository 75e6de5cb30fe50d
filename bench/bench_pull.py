"""Cold pull from the local registry: throughput and imaged's peak RSS.

A ~200 MB image in 5 layers (incompressible data, gzip) is pulled into an
empty store through the gateway; a 5-layer image with layers 5x smaller is
pulled the same way into another empty store. imaged streams blobs to disk
and unpacks from disk, so its peak RSS must be about the same for both:
`rss_growth_large_vs_small_mb` should be near zero.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from cri_api.v1 import api_pb2

from tests.fixtures_images import start_registry
from tests.harness import Stack
from tests.oci_images import File, build_and_push, tar_layer

LAYERS = 5
LARGE_LAYER_MB = 40
SMALL_LAYER_MB = 8


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.interval)


def _push(registry: Any, name: str, layer_mb: int) -> Any:
    layers = [tar_layer([File(f"data-{index}", os.urandom(layer_mb << 20))]) for index in range(LAYERS)]
    return build_and_push(registry, name, "v1", layers=layers)


def _cold_pull(reference: str, total_bytes: int) -> dict[str, float]:
    stack = Stack()
    try:
        stack.start()
        pid = stack.service_pid("imaged")
        baseline = psutil.Process(pid).memory_info().rss
        sampler = RssSampler(pid)
        sampler.start()
        started = time.monotonic()
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=reference)), timeout=600)
        seconds = time.monotonic() - started
        sampler.stopped.set()
        sampler.join()
        return {
            "seconds": round(seconds, 2),
            "mb_per_s": round(total_bytes / seconds / 1e6, 1),
            "baseline_rss_mb": round(baseline / 1e6, 1),
            "peak_rss_mb": round(sampler.peak / 1e6, 1),
        }
    finally:
        stack.stop()


def run() -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="pyrio-bench-registry-", dir="/tmp"))
    storage = workdir / "storage"
    storage.mkdir()
    registry = start_registry(workdir, storage, "bench")
    try:
        large = _push(registry, "bench/large", LARGE_LAYER_MB)
        small = _push(registry, "bench/small", SMALL_LAYER_MB)
        large_bytes = sum(descriptor["size"] for descriptor in large.manifest["layers"])
        small_bytes = sum(descriptor["size"] for descriptor in small.manifest["layers"])
        large_result = _cold_pull(large.reference, large_bytes)
        small_result = _cold_pull(small.reference, small_bytes)
    finally:
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "image_mb": round(large_bytes / 1e6, 1),
        "layers": LAYERS,
        "cold_pull_seconds": large_result["seconds"],
        "cold_pull_mb_per_s": large_result["mb_per_s"],
        "imaged_baseline_rss_mb": large_result["baseline_rss_mb"],
        "imaged_peak_rss_mb": large_result["peak_rss_mb"],
        f"small_image_mb ({LAYERS}x{SMALL_LAYER_MB} MB)": round(small_bytes / 1e6, 1),
        "small_image_mb_per_s": small_result["mb_per_s"],
        "small_image_imaged_peak_rss_mb": small_result["peak_rss_mb"],
        "rss_growth_large_vs_small_mb": round(large_result["peak_rss_mb"] - small_result["peak_rss_mb"], 1),
    }
