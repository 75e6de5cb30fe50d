"""A private stack with the busybox test image pulled, for the benchmarks."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cri_api.v1 import api_pb2

from tests.fixtures_images import start_registry
from tests.harness import Stack
from tests.oci_images import push_busybox


@contextmanager
def local_registry() -> Iterator[tuple[Any, str]]:
    """(a local registry, the reference of busybox pushed to it), removed after."""
    workdir = Path(tempfile.mkdtemp(prefix="pyrio-bench-registry-"))
    registry = start_registry(workdir, workdir / "storage", "bench")
    try:
        yield registry, push_busybox(registry, "bench/busybox", "latest").reference
    finally:
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def busybox_stack() -> Iterator[tuple[Stack, str]]:
    """(a started Stack, the reference of busybox pulled into it), both removed after."""
    with local_registry() as (_registry, image):
        stack = Stack()
        try:
            stack.start()
            stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
            yield stack, image
        finally:
            stack.stop()
