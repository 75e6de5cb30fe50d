"""A private stack with the busybox test image pulled, for the benchmarks."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cri_api.v1 import api_pb2

from tests.fixtures_images import start_registry
from tests.harness import Stack
from tests.oci_images import push_busybox


@contextmanager
def busybox_stack() -> Iterator[tuple[Stack, str]]:
    """(a started Stack, the reference of busybox pulled into it), both removed after."""
    workdir = Path(tempfile.mkdtemp(prefix="pyrio-bench-registry-"))
    registry = start_registry(workdir, workdir / "storage", "bench")
    stack = Stack()
    try:
        image = push_busybox(registry, "bench/busybox", "latest").reference
        stack.start()
        stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
        yield stack, image
    finally:
        stack.stop()
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
