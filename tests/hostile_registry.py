"""A registry on 127.0.0.1 that lies, for the tests of a hostile registry.

It serves the distribution API's read side from memory: manifests as given,
and blobs by a `BlobPlan` each: the true bytes, bytes without a declared
length that never end, a Content-Length far beyond what the manifest
declares, or bytes dribbled at a fixed rate. It counts what it sent and how
many blob requests are open, so a test can tell that a pull stopped.

Also here: layers built already compressed (a gzip bomb is never held
uncompressed in memory) and a PAX sparse layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from tests.oci_images import LAYER_MEDIA_TYPES, OCI_CONFIG, OCI_MANIFEST, Layer, image_config, sha256_digest

BLOCK = 512


@dataclass
class BlobPlan:
    data: bytes = b""
    # "honest", "endless" (no Content-Length, zeros until the client goes),
    # "huge-length" (Content-Length 2^40, then `data`), "dribble" (one byte
    # every `interval` seconds, with the true Content-Length).
    mode: str = "honest"
    interval: float = 1.0


@dataclass
class HostileImage:
    reference: str
    manifest: dict[str, Any]


@dataclass
class PrebuiltLayer(Layer):
    """A layer whose blob and diff id were computed without holding its tar."""

    prebuilt_blob: bytes = b""
    prebuilt_diff_id: str = ""

    @property
    def blob(self) -> bytes:
        return self.prebuilt_blob

    @property
    def diff_id(self) -> str:
        return self.prebuilt_diff_id


def gzip_bomb_layer(file_size: int, name: str = "zeros") -> PrebuiltLayer:
    """One regular file of `file_size` zero bytes, gzip-compressed as it is
    generated: 256 MiB of zeros become about 250 KB."""
    header = tarfile.TarInfo(name)
    header.size, header.mode, header.mtime = file_size, 0o644, 1_700_000_000
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    hasher = hashlib.sha256()
    parts = []

    def feed(data: bytes) -> None:
        hasher.update(data)
        parts.append(compressor.compress(data))

    feed(header.tobuf(tarfile.GNU_FORMAT))
    zeros = bytes(1 << 20)
    remaining = file_size + (-file_size % BLOCK) + 2 * BLOCK * 10  # data, padding, end of archive (one record)
    while remaining:
        step = min(remaining, len(zeros))
        feed(zeros[:step])
        remaining -= step
    parts.append(compressor.flush())
    return PrebuiltLayer(tar=b"", prebuilt_blob=b"".join(parts), prebuilt_diff_id="sha256:" + hasher.hexdigest())


def sparse_layer(apparent_size: int, name: str = "sparse", tail: bytes = b"end") -> Layer:
    """A PAX (GNU 0.1) sparse file of `apparent_size` bytes whose only data
    is `tail` at its end: the rest is one hole."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(tail), 0o644, 1_700_000_000
        info.pax_headers = {"GNU.sparse.map": f"{apparent_size - len(tail)},{len(tail)}", "GNU.sparse.realsize": str(apparent_size)}
        tar.addfile(info, io.BytesIO(tail))
    return Layer(buffer.getvalue(), "gzip")


class HostileRegistry:
    def __init__(self) -> None:
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.blobs: dict[str, BlobPlan] = {}
        self.sent: dict[str, int] = {}
        self.blob_requests: list[str] = []
        self.open_blob_requests = 0
        self.most_open_blob_requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path in ("/v2/", "/v2"):
                    self._answer(200, b"{}", "application/json")
                elif "/manifests/" in path:
                    found = registry.manifests.get(path.rsplit("/manifests/", 1)[1])
                    if found is None:
                        self._answer(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}', "application/json")
                    else:
                        self._answer(200, found[0], found[1], {"Docker-Content-Digest": sha256_digest(found[0])})
                elif "/blobs/" in path:
                    self._blob(path.rsplit("/blobs/", 1)[1])
                else:
                    self._answer(404, b"", "text/plain")

            def _answer(self, status: int, body: bytes, media_type: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _blob(self, digest: str) -> None:
                plan = registry.blobs.get(digest)
                if plan is None:
                    self._answer(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}', "application/json")
                    return
                with registry._lock:
                    registry.blob_requests.append(digest)
                    registry.open_blob_requests += 1
                    registry.most_open_blob_requests = max(registry.most_open_blob_requests, registry.open_blob_requests)
                try:
                    self._send_blob(digest, plan)
                except OSError:
                    pass  # the client went away: what a refusal looks like from here
                finally:
                    with registry._lock:
                        registry.open_blob_requests -= 1
                    self.close_connection = True

            def _send_blob(self, digest: str, plan: BlobPlan) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Connection", "close")
                if plan.mode == "honest" or plan.mode == "dribble":
                    self.send_header("Content-Length", str(len(plan.data)))
                elif plan.mode == "huge-length":
                    self.send_header("Content-Length", str(1 << 40))
                self.end_headers()
                if plan.mode == "endless":
                    chunk = bytes(64 << 10)
                    while not registry._stop.is_set():
                        self.wfile.write(chunk)
                        registry._count(digest, len(chunk))
                elif plan.mode == "dribble":
                    for index in range(len(plan.data)):
                        if registry._stop.wait(plan.interval):
                            return
                        self.wfile.write(plan.data[index:index + 1])
                        self.wfile.flush()
                        registry._count(digest, 1)
                else:
                    self.wfile.write(plan.data)
                    registry._count(digest, len(plan.data))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _count(self, digest: str, size: int) -> None:
        with self._lock:
            self.sent[digest] = self.sent.get(digest, 0) + size

    def add_image(
        self,
        repository: str,
        tag: str,
        layers: list[Layer],
        plans: list[BlobPlan] | None = None,
        declared_sizes: list[Any] | None = None,
    ) -> HostileImage:
        """Serve an image of `layers`; each layer's blob is served by its plan
        (default honest) and declared in the manifest with its size, or with
        `declared_sizes[i]` (None: no size at all)."""
        descriptors = []
        for index, layer in enumerate(layers):
            blob = layer.blob
            digest = sha256_digest(blob)
            plan = (plans or [])[index] if plans and index < len(plans) else BlobPlan()
            plan.data = plan.data or blob
            self.blobs[digest] = plan
            descriptor: dict[str, Any] = {"mediaType": LAYER_MEDIA_TYPES[("oci", layer.compression)], "digest": digest}
            size: Any = len(blob)
            if declared_sizes is not None and index < len(declared_sizes):
                size = declared_sizes[index]
            if size is not None:
                descriptor["size"] = size
            descriptors.append(descriptor)
        config = json.dumps(image_config([layer.diff_id for layer in layers], {"Cmd": ["sh"]}), sort_keys=True).encode()
        self.blobs[sha256_digest(config)] = BlobPlan(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
            "layers": descriptors,
        }
        body = json.dumps(manifest).encode()
        self.manifests[tag] = (body, OCI_MANIFEST)
        self.manifests[sha256_digest(body)] = (body, OCI_MANIFEST)
        return HostileImage(f"{self.host}/{repository}:{tag}", manifest)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once no blob request is open any more (the client let go)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.open_blob_requests == 0:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileRegistry]:
    """A HostileRegistry for the module (import this fixture where needed)."""
    registry = HostileRegistry()
    try:
        yield registry
    finally:
        registry.stop()
