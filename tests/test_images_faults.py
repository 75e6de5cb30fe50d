"""imaged under faults: mirrors that fail, stalled downloads, SIGKILL mid-pull.

These need their own stack (a reconfigured imaged, a killed imaged), so one
module-scoped stack serves them all.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_images import Registry, TlsRegistry, free_port
from tests.harness import Stack, wait_until
from tests.oci_images import File, build_and_push, tar_layer

MIRRORED_DOMAIN = "registry.pyrio.test"
PROGRESS_TIMEOUT = 3


class SlowProxy:
    """A plain-HTTP proxy in front of the test registry that can slow blob
    bodies down (`delay` seconds per 64 KiB) or stall them after
    `stall_after` bytes, to reproduce slow and hung registries."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self.stall_after: int | None = None
        self.sent_blob_bytes = 0
        self.active_blob_downloads = 0
        self.most_concurrent_blob_downloads = 0
        self._count_lock = threading.Lock()
        self.stop_event = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _relay(self, method: str) -> None:
                connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {key: value for key, value in self.headers.items() if key.lower() not in ("host", "connection")}
                connection.request(method, self.path, headers=headers)
                response = connection.getresponse()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(key, value)
                self.send_header("Connection", "close")
                self.end_headers()
                is_blob = "/blobs/" in self.path and method == "GET"
                counted = is_blob and proxy.download_started()
                length = int(response.getheader("Content-Length") or -1)
                sent = 0
                try:
                    while chunk := response.read(65536):
                        if counted and sent + len(chunk) >= length:
                            # Finished as the last bytes go out: imaged may
                            # start its next download the instant it has them.
                            counted = proxy.download_finished()
                        if is_blob and proxy.stall_after is not None and sent >= proxy.stall_after:
                            proxy.stop_event.wait(120)
                            break
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        if is_blob:
                            proxy.sent_blob_bytes += len(chunk)
                            if proxy.delay:
                                time.sleep(proxy.delay)
                finally:
                    if counted:
                        proxy.download_finished()
                    connection.close()
                self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._relay("GET")

            def do_HEAD(self) -> None:  # noqa: N802
                self._relay("HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def download_started(self) -> bool:
        with self._count_lock:
            self.active_blob_downloads += 1
            self.most_concurrent_blob_downloads = max(self.most_concurrent_blob_downloads, self.active_blob_downloads)
        return True

    def download_finished(self) -> bool:
        with self._count_lock:
            self.active_blob_downloads -= 1
        return False

    def stop(self) -> None:
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fault_stack(registry: Registry, tls_registry: TlsRegistry) -> Iterator[Stack]:
    dead_port = free_port()  # bound and released: nothing listens there
    overrides = {
        "image": {
            "pull_progress_timeout": PROGRESS_TIMEOUT,
            "max_concurrent_downloads": 2,
            # Both slots for one registry (by default it gets all but one).
            "max_downloads_per_registry": 2,
            "pinned_images": [f"{MIRRORED_DOMAIN}/pau*"],
            # The first mirror refuses connections; the second is the test registry.
            "registries": {
                MIRRORED_DOMAIN: {"mirrors": [f"127.0.0.1:{dead_port}", registry.host]},
                # HTTPS verified with the test CA...
                tls_registry.host: {"ca_file": str(tls_registry.ca_file)},
                # ...and the same server by a name its certificate lacks, trusted as insecure.
                f"localhost:{tls_registry.host.split(':')[1]}": {"insecure": True},
            },
        }
    }
    own = Stack(config_overrides=overrides)
    try:
        own.start()
        yield own
    finally:
        own.stop()
        assert not [line for line in open("/proc/self/mountinfo") if str(own.root) in line]


@pytest.fixture
def proxy(registry: Registry) -> Iterator[SlowProxy]:
    own = SlowProxy(registry.host)
    try:
        yield own
    finally:
        own.stop()


def pull(stack: Stack, image: str, timeout: float = 120) -> str:
    return stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=timeout).image_ref


def pull_in_background(stack: Stack, image: str) -> tuple[threading.Thread, list[grpc.RpcError]]:
    """A started thread pulling `image`, and the list its error lands in."""
    errors: list[grpc.RpcError] = []

    def background_pull() -> None:
        try:
            pull(stack, image)
        except grpc.RpcError as exc:
            errors.append(exc)

    puller = threading.Thread(target=background_pull)
    puller.start()
    return puller, errors


def image_status(stack: Stack, image: str) -> api_pb2.ImageStatusResponse:
    return stack.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)), timeout=30)


def store(stack: Stack) -> Path:
    return stack.state_dir / "imaged"


def test_mirror_keeps_the_repository_path_and_the_name(fault_stack: Stack, registry: Registry) -> None:
    image = build_and_push(registry, "pause", "3.10", layers=[tar_layer([File("pause", b"mirrored")])])
    upstream_name = f"{MIRRORED_DOMAIN}/pause:3.10"
    assert pull(fault_stack, upstream_name) == image.config_digest
    found = image_status(fault_stack, upstream_name).image
    assert list(found.repo_tags) == [upstream_name]
    assert list(found.repo_digests) == [f"{MIRRORED_DOMAIN}/pause@{image.manifest_digest}"]
    assert found.pinned  # image.pinned_images
    assert "mirror failed, trying the next endpoint" in fault_stack.logs("imaged")


def test_https_with_a_configured_ca_and_insecure(fault_stack: Stack, registry: Registry, tls_registry: TlsRegistry) -> None:
    image = build_and_push(registry, f"pyrio/tls-{uuid.uuid4().hex[:8]}", "v1", layers=[tar_layer([File("tls", b"yes")])])
    assert pull(fault_stack, f"{tls_registry.host}/{image.repository}:v1") == image.config_digest
    insecure_name = f"localhost:{tls_registry.host.split(':')[1]}/{image.repository}:v1"
    assert pull(fault_stack, insecure_name) == image.config_digest
    assert insecure_name in image_status(fault_stack, insecure_name).image.repo_tags


def test_layers_download_concurrently_within_the_bound(fault_stack: Stack, registry: Registry, proxy: SlowProxy) -> None:
    layers = [tar_layer([File(f"layer{index}", os.urandom(1 << 20))]) for index in range(5)]
    image = build_and_push(registry, f"pyrio/parallel-{uuid.uuid4().hex[:8]}", "v1", layers=layers)
    proxy.delay = 0.01
    assert pull(fault_stack, f"{proxy.host}/{image.repository}:v1") == image.config_digest
    # max_concurrent_downloads is 2 in this stack.
    assert proxy.most_concurrent_blob_downloads == 2


def test_stalled_download_is_an_error_not_a_hang(fault_stack: Stack, registry: Registry, proxy: SlowProxy) -> None:
    image = build_and_push(registry, f"pyrio/stall-{uuid.uuid4().hex[:8]}", "v1", layers=[tar_layer([File("big", os.urandom(2 << 20))])])
    proxy.stall_after = 256 * 1024
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        pull(fault_stack, f"{proxy.host}/{image.repository}:v1")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stalled" in caught.value.details()
    assert time.monotonic() - started < PROGRESS_TIMEOUT + 20
    assert os.listdir(store(fault_stack) / "tmp") == []
    assert not image_status(fault_stack, f"{proxy.host}/{image.repository}:v1").HasField("image")


def test_imaged_killed_mid_pull_then_clean_repull(fault_stack: Stack, registry: Registry, proxy: SlowProxy) -> None:
    layers = [tar_layer([File(f"part{index}", os.urandom(3 << 20))]) for index in range(3)]
    image = build_and_push(registry, f"pyrio/killed-{uuid.uuid4().hex[:8]}", "v1", layers=layers)
    slow_name = f"{proxy.host}/{image.repository}:v1"
    proxy.delay = 0.02  # about 3 MiB/s: the pull takes seconds
    puller, errors = pull_in_background(fault_stack, slow_name)
    tmp = store(fault_stack) / "tmp"
    # Kill once some layer bytes are on imaged's disk, halfway through.
    wait_until(lambda: proxy.sent_blob_bytes > (2 << 20) and os.listdir(tmp), timeout=60, interval=0.02, what="a download in progress")
    pid = fault_stack.service_pid("imaged")
    os.kill(pid, signal.SIGKILL)
    puller.join(60)
    assert errors and errors[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    new_pid = fault_stack.wait_service_running("imaged")
    assert new_pid != pid
    fault_stack.wait_ready()
    # The restart threw away the half download; nothing half-made is visible.
    assert os.listdir(tmp) == []
    assert not image_status(fault_stack, slow_name).HasField("image")
    for entry in os.listdir(store(fault_stack) / "layers"):
        assert (store(fault_stack) / "layers" / entry / "layer.json").exists()
    proxy.delay = 0
    assert pull(fault_stack, slow_name) == image.config_digest
    assert image_status(fault_stack, slow_name).image.id == image.config_digest


def test_restarted_imaged_keeps_images_and_root_filesystems(fault_stack: Stack, registry: Registry) -> None:
    from common.config import load_config
    from common.daemon import client_for

    image = build_and_push(registry, f"pyrio/restart-{uuid.uuid4().hex[:8]}", "v1", layers=[tar_layer([File("kept", b"yes")])])
    pull(fault_stack, image.reference)
    client = client_for(load_config(str(fault_stack.config_path)), "imaged", timeout=30)
    container_id = uuid.uuid4().hex * 2
    try:
        merged = Path(client.call("rootfs.prepare", {"container_id": container_id, "image": image.reference})["rootfs"])
        (merged / "written").write_text("before restart")
        fault_stack.supervisorctl("restart", "imaged")
        fault_stack.wait_ready()
        assert image_status(fault_stack, image.reference).image.id == image.config_digest
        assert os.path.ismount(merged) and (merged / "written").read_text() == "before restart"
        # After an unmount (as after a reboot) a restart mounts it again.
        subprocess.run(["umount", str(merged)], check=True)
        fault_stack.supervisorctl("restart", "imaged")
        fault_stack.wait_ready()
        assert os.path.ismount(merged) and (merged / "kept").read_text() == "yes"
        assert (merged / "written").read_text() == "before restart"
        listed = {item["container_id"]: item for item in client.call("rootfs.list", idempotent=True)}
        assert listed[container_id]["mounted"] and listed[container_id]["image_id"] == image.config_digest
    finally:
        client.call("rootfs.remove", {"container_id": container_id}, idempotent=True)
        client.close()
    assert not merged.exists()


def test_imaged_killed_mid_unpack_leaves_no_half_layer(fault_stack: Stack, registry: Registry) -> None:
    # Many small files: unpacking takes seconds, downloading an instant.
    entries = [File(f"files/{index:05d}", b"x" * 100) for index in range(12000)]
    image = build_and_push(registry, f"pyrio/unpack-{uuid.uuid4().hex[:8]}", "v1", layers=[tar_layer(entries)])
    diff_hex = image.config["rootfs"]["diff_ids"][0].split(":")[1]
    puller, errors = pull_in_background(fault_stack, image.reference)
    tmp = store(fault_stack) / "tmp"

    def unpacking() -> bool:
        for entry in os.listdir(tmp):
            files = tmp / entry / "diff" / "files"
            if entry.startswith("layer-") and files.is_dir() and len(os.listdir(files)) > 500:
                return True
        return False

    wait_until(unpacking, timeout=60, interval=0.01, what="an unpack in progress")
    pid = fault_stack.service_pid("imaged")
    os.kill(pid, signal.SIGKILL)
    puller.join(60)
    assert errors, "the pull finished before imaged was killed"
    fault_stack.wait_service_running("imaged")
    fault_stack.wait_ready()
    assert os.listdir(tmp) == []
    assert diff_hex not in os.listdir(store(fault_stack) / "layers")
    assert pull(fault_stack, image.reference) == image.config_digest
    assert len(os.listdir(store(fault_stack) / "layers" / diff_hex / "diff" / "files")) == 12000
