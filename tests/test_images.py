"""The CRI ImageService through the gateway socket, against a real registry.

Images are built by the tests from /bin/busybox (tests/oci_images.py) and
pushed to Debian's docker-registry on 127.0.0.1 (tests/fixtures_images.py).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from common.config import load_config
from common.daemon import client_for
from common.rpc import RpcClient
from services.imaged.manifest import node_platform
from tests.fixtures_images import AuthRegistries, Registry, TlsRegistry
from tests.harness import Stack
from tests.oci_images import (
    Device,
    Dir,
    File,
    Hardlink,
    Layer,
    Opaque,
    PushedImage,
    Symlink,
    Whiteout,
    build_and_push,
    busybox_layer,
    push_index,
    tar_layer,
)

PULL_TIMEOUT = 120


def pull(stack: Stack, image: str, auth: api_pb2.AuthConfig | None = None) -> str:
    request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image))
    if auth is not None:
        request.auth.CopyFrom(auth)
    return stack.images.PullImage(request, timeout=PULL_TIMEOUT).image_ref


def status(stack: Stack, image: str, verbose: bool = False) -> api_pb2.ImageStatusResponse:
    return stack.images.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image), verbose=verbose), timeout=30
    )


def remove(stack: Stack, image: str) -> None:
    stack.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=30)


def list_images(stack: Stack, image: str = "") -> list[api_pb2.Image]:
    request = api_pb2.ListImagesRequest()
    if image:
        request.filter.image.image = image
    return list(stack.images.ListImages(request, timeout=30).images)


def pull_error(stack: Stack, image: str, auth: api_pb2.AuthConfig | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        pull(stack, image, auth)
    return caught.value


def store_dir(stack: Stack) -> Path:
    return stack.state_dir / "imaged"


def store_snapshot(stack: Stack) -> dict[str, list[str]]:
    root = store_dir(stack)
    return {name: sorted(os.listdir(root / name)) for name in ("layers", "images", "tmp", "containers", "rootfs")}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def imaged(stack: Stack) -> Iterator[RpcClient]:
    client = client_for(load_config(str(stack.config_path)), "imaged", timeout=60)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def rootfs_cleanup(imaged: RpcClient) -> Iterator[list[str]]:
    """Container ids whose root filesystems the test prepared; removed at the end."""
    container_ids: list[str] = []
    try:
        yield container_ids
    finally:
        for container_id in container_ids:
            imaged.call("rootfs.remove", {"container_id": container_id})


def tree(root: Path) -> dict[str, str]:
    """Every path under root with what it is: file content, link target, dir."""
    found: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            if path.is_symlink():
                found[relative] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[relative] = "dir"
            elif path.is_file():
                found[relative] = path.read_bytes().decode(errors="replace")[:40]
            else:
                found[relative] = "special"
    return found


# --- pulling and looking up ------------------------------------------------------


def test_pull_by_tag_then_status_list_remove(stack: Stack, registry: Registry) -> None:
    name = unique("pyrio/tagged")
    # A label of its own: the same content as another test's busybox would be
    # the same image (one id), rightly listed with that image's tags too.
    image = build_and_push(registry, name, "v1", layers=[busybox_layer()], config={"Cmd": ["sh"], "Labels": {"test": name}})
    image_ref = pull(stack, image.reference)
    assert image_ref == image.config_digest
    by_tag = status(stack, image.reference).image
    assert by_tag.id == image.config_digest
    assert list(by_tag.repo_tags) == [image.reference]
    assert list(by_tag.repo_digests) == [image.digest_reference]
    assert by_tag.size > 1_000_000  # busybox itself
    assert not by_tag.pinned
    for name in (image.config_digest, image.config_digest.split(":")[1], image.config_digest.split(":")[1][:12], image.digest_reference):
        assert status(stack, name).image.id == image.config_digest, name
    assert image.config_digest in [item.id for item in list_images(stack)]
    assert [item.id for item in list_images(stack, image.reference)] == [image.config_digest]
    remove(stack, image.reference)
    assert not status(stack, image.reference).HasField("image")
    assert image.config_digest not in [item.id for item in list_images(stack)]
    remove(stack, image.reference)  # idempotent


def test_pull_by_digest(stack: Stack, registry: Registry) -> None:
    image = build_and_push(registry, unique("pyrio/digest"), "v1", layers=[tar_layer([File("hello", b"digest")])])
    assert pull(stack, image.digest_reference) == image.config_digest
    found = status(stack, image.digest_reference).image
    assert list(found.repo_tags) == []  # pulled by digest only
    assert list(found.repo_digests) == [image.digest_reference]
    remove(stack, image.config_digest)
    assert not status(stack, image.config_digest).HasField("image")


def test_unknown_image_is_an_empty_answer(stack: Stack, registry: Registry) -> None:
    assert not status(stack, f"{registry.host}/no/such:image").HasField("image")
    assert not status(stack, "sha256:" + "0" * 64).HasField("image")
    assert list_images(stack, f"{registry.host}/no/such:image") == []
    remove(stack, f"{registry.host}/no/such:image")


def test_invalid_reference_is_invalid_argument(stack: Stack) -> None:
    for bad in ("UPPER/Case:tag", "name:bad tag", "name@sha256:short"):
        error = pull_error(stack, bad)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    with pytest.raises(grpc.RpcError) as caught:
        pull(stack, "")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_tag_and_repository_are_not_found(stack: Stack, registry: Registry, busybox_image: PushedImage) -> None:
    error = pull_error(stack, f"{registry.host}/{busybox_image.repository}:no-such-tag")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-tag" in error.details()
    error = pull_error(stack, f"{registry.host}/no/such-repository:latest")
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_schema1_manifest_is_refused_clearly(stack: Stack) -> None:
    """docker-registry no longer serves schema 1, so a tiny fake registry does."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    manifest = json.dumps({"schemaVersion": 1, "name": "old/image", "tag": "v1", "architecture": "amd64",
                           "fsLayers": [], "history": [], "signatures": []}).encode()

    class Schema1Registry(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body, content_type = (b"{}", "application/json")
            if self.path == "/v2/old/image/manifests/v1":
                body, content_type = manifest, "application/vnd.docker.distribution.manifest.v1+prettyjws"
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Schema1Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        error = pull_error(stack, f"127.0.0.1:{server.server_address[1]}/old/image:v1")
    finally:
        server.shutdown()
        server.server_close()
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "schema 1" in error.details()


def test_user_env_and_verbose_config(stack: Stack, registry: Registry) -> None:
    named = build_and_push(registry, unique("pyrio/user"), "v1", config={"User": "app", "Env": ["GREETING=hello"], "WorkingDir": "/home/app"})
    numeric = build_and_push(registry, unique("pyrio/uid"), "v1", config={"User": "1000:1000"})
    pull(stack, named.reference)
    pull(stack, numeric.reference)
    reply = status(stack, named.reference, verbose=True)
    assert reply.image.username == "app" and not reply.image.HasField("uid")
    info = json.loads(reply.info["info"])
    assert "GREETING=hello" in info["imageSpec"]["config"]["Env"]
    assert info["imageSpec"]["config"]["WorkingDir"] == "/home/app"
    numeric_image = status(stack, numeric.reference).image
    assert numeric_image.uid.value == 1000 and numeric_image.username == ""


def test_docker_schema2_and_zstd_layers(stack: Stack, registry: Registry, imaged: RpcClient, rootfs_cleanup: list[str]) -> None:
    docker = build_and_push(registry, unique("pyrio/docker"), "v1", layers=[tar_layer([File("docker.txt", b"schema2")])], media="docker")
    zstd = build_and_push(
        registry, unique("pyrio/zstd"), "v1",
        layers=[Layer(tar_layer([File("one.txt", b"gzip")]), "gzip"), Layer(tar_layer([File("two.txt", b"zstd")]), "zstd"),
                Layer(tar_layer([File("three.txt", b"plain")]), "none")],
    )
    assert pull(stack, docker.reference) == docker.config_digest
    assert pull(stack, zstd.reference) == zstd.config_digest
    container_id = uuid.uuid4().hex * 2
    rootfs_cleanup.append(container_id)
    merged = Path(imaged.call("rootfs.prepare", {"container_id": container_id, "image": zstd.reference})["rootfs"])
    assert tree(merged) == {"one.txt": "gzip", "two.txt": "zstd", "three.txt": "plain"}


def test_multi_arch_index_selects_this_node(stack: Stack, registry: Registry) -> None:
    node = node_platform()
    repository = unique("pyrio/multiarch")
    other_arch = "arm64" if node.architecture != "arm64" else "amd64"
    ours = build_and_push(registry, repository, "ours", layers=[tar_layer([File("arch", node.architecture.encode())])], architecture=node.architecture)
    other = build_and_push(registry, repository, "other", layers=[tar_layer([File("arch", other_arch.encode())])], architecture=other_arch)
    ours_platform = {"os": "linux", "architecture": node.architecture, **({"variant": node.variant} if node.variant else {})}
    for media in ("oci", "docker"):
        if media == "docker":
            ours = build_and_push(registry, repository, "ours-d", layers=[tar_layer([File("arch", b"docker")])], architecture=node.architecture, media="docker")
            other = build_and_push(registry, repository, "other-d", layers=[tar_layer([File("arch", b"other")])], architecture=other_arch, media="docker")
        index = push_index(
            registry, repository, f"multi-{media}",
            [(other, {"os": "linux", "architecture": other_arch}), (ours, ours_platform)], media=media,
        )
        assert pull(stack, index.reference) == ours.config_digest
        found = status(stack, index.reference).image
        assert index.digest_reference in found.repo_digests
    only_other = push_index(registry, repository, "only-other", [(other, {"os": "linux", "architecture": other_arch})], media="docker")
    error = pull_error(stack, only_other.reference)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert f"linux/{node.architecture}" in error.details()


def test_image_fs_info_reports_the_store(stack: Stack, busybox_image: PushedImage) -> None:
    pull(stack, busybox_image.reference)
    reply = stack.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=60)
    (images_fs,) = reply.image_filesystems
    assert images_fs.fs_id.mountpoint == str(store_dir(stack))
    assert images_fs.used_bytes.value > 1_000_000 and images_fs.inodes_used.value > 10
    assert images_fs.timestamp > 0
    # One filesystem for images and containers (as CRI-O by default): not a split disk.
    assert list(reply.container_filesystems) == [images_fs]


# --- auth ---------------------------------------------------------------------------


def test_basic_auth(stack: Stack, auth_registries: AuthRegistries, registry: Registry) -> None:
    image = build_and_push(registry, unique("pyrio/basic"), "v1", layers=[tar_layer([File("secret", b"basic")])])
    reference = f"{auth_registries.basic.host}/{image.repository}:v1"
    anonymous = pull_error(stack, reference)
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no credentials" in anonymous.details()
    wrong = pull_error(stack, reference, api_pb2.AuthConfig(username=auth_registries.username, password="wrong"))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "rejected the credentials" in wrong.details()
    assert pull(stack, reference, api_pb2.AuthConfig(username=auth_registries.username, password=auth_registries.password)) == image.config_digest
    remove(stack, reference)
    encoded = base64.b64encode(f"{auth_registries.username}:{auth_registries.password}".encode()).decode()
    assert pull(stack, reference, api_pb2.AuthConfig(auth=encoded)) == image.config_digest
    assert status(stack, reference).image.id == image.config_digest


def test_bearer_token_auth(stack: Stack, auth_registries: AuthRegistries, registry: Registry) -> None:
    image = build_and_push(registry, unique("pyrio/bearer"), "v1", layers=[tar_layer([File("secret", b"bearer")])])
    reference = f"{auth_registries.token.host}/{image.repository}:v1"
    anonymous = pull_error(stack, reference)
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = pull_error(stack, reference, api_pb2.AuthConfig(username=auth_registries.username, password="wrong"))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "refused the given credentials" in wrong.details()
    good = api_pb2.AuthConfig(username=auth_registries.username, password=auth_registries.password)
    assert pull(stack, reference, good) == image.config_digest
    granted = auth_registries.token_server.requests[-1]
    assert granted["authorized"] and granted["params"]["scope"] == f"repository:{image.repository}:pull"
    remove(stack, reference)
    # The CRI identity token is an OAuth2 refresh token.
    identity = api_pb2.AuthConfig(identity_token=auth_registries.token_server.refresh_token)
    assert pull(stack, reference, identity) == image.config_digest
    remove(stack, reference)
    # A registry token is used as the bearer token directly.
    token = auth_registries.token_server.issuer.token("pyrio", [{"type": "repository", "name": image.repository, "actions": ["pull"]}])
    assert pull(stack, reference, api_pb2.AuthConfig(registry_token=token)) == image.config_digest


def test_https_without_the_ca_is_refused(stack: Stack, registry: Registry, tls_registry: TlsRegistry) -> None:
    image = build_and_push(registry, unique("pyrio/untrusted"), "v1", layers=[tar_layer([File("tls", b"no")])])
    error = pull_error(stack, f"{tls_registry.host}/{image.repository}:v1")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in error.details() or "certificate verify failed" in error.details()


# --- concurrency and integrity --------------------------------------------------------


def test_two_concurrent_pulls_do_the_work_once(stack: Stack, registry: Registry) -> None:
    layers = [tar_layer([File(f"blob{index}", os.urandom(6 << 20))]) for index in range(2)]
    image = build_and_push(registry, unique("pyrio/concurrent"), "v1", layers=layers)
    results: list[Any] = [None, None]

    def worker(slot: int) -> None:
        try:
            results[slot] = pull(stack, image.reference)
        except grpc.RpcError as exc:  # reported by the assert below
            results[slot] = exc

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PULL_TIMEOUT)
    assert results == [image.config_digest, image.config_digest]
    assert "joining a pull in progress" in stack.logs("imaged")
    layer_dirs = os.listdir(store_dir(stack) / "layers")
    for digest in image.config["rootfs"]["diff_ids"]:
        assert digest.split(":")[1] in layer_dirs
    assert os.listdir(store_dir(stack) / "tmp") == []


@pytest.mark.parametrize("tampered", ["layer", "config", "manifest"])
def test_tampered_content_fails_and_leaves_the_store_unchanged(
    stack: Stack, registry: Registry, pulled_busybox: PushedImage, tampered: str
) -> None:
    # The busybox layer is already in the store (pulled_busybox), so the
    # intact first layer adds nothing and the store must not change at all.
    image = build_and_push(registry, unique("pyrio/tampered"), "v1", layers=[busybox_layer(), tar_layer([File("payload", os.urandom(1 << 20))])])
    digest = {"layer": image.layer_digests[1], "config": image.config_digest, "manifest": image.manifest_digest}[tampered]
    blob = registry.blob_data_path(digest)
    data = bytearray(blob.read_bytes())
    if tampered == "layer":
        data[len(data) // 2] ^= 0xFF
    else:
        # Still valid JSON, so only the digest check can notice.
        data = bytearray(json.dumps(json.loads(bytes(data)), indent=3).encode())
    blob.write_bytes(bytes(data))
    before = store_snapshot(stack)
    error = pull_error(stack, image.reference)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "mismatch" in error.details() and digest in error.details()
    assert store_snapshot(stack) == before
    assert not status(stack, image.reference).HasField("image")


MALICIOUS_LAYERS = {
    "path-traversal": lambda sentinel: [File(f"../../../../../../../..{sentinel}", b"pwned")],
    "absolute-path": lambda sentinel: [File(sentinel, b"pwned")],
    "absolute-symlink-escape": lambda sentinel: [Symlink("escape", os.path.dirname(sentinel)), File(f"escape/{os.path.basename(sentinel)}", b"pwned")],
    "relative-symlink-escape": lambda sentinel: [
        Symlink("up", "../../../../../../../../.."), File(f"up{sentinel}", b"pwned")],
    "hardlink-escape": lambda sentinel: [Hardlink("passwd", "../../../../../../../../etc/passwd")],
    "hardlink-through-symlink": lambda sentinel: [Symlink("etc-link", "/etc"), Hardlink("passwd", "etc-link/passwd")],
    "whiteout-through-symlink": lambda sentinel: [Symlink("escape", os.path.dirname(sentinel)), Whiteout(f"escape/{os.path.basename(sentinel)}")],
}


@pytest.mark.parametrize("kind", sorted(MALICIOUS_LAYERS))
def test_malicious_layer_is_refused(stack: Stack, registry: Registry, tmp_path: Path, kind: str) -> None:
    sentinel_dir = tmp_path / "outside"
    sentinel_dir.mkdir()
    sentinel = str(sentinel_dir / "pwned")
    if kind == "whiteout-through-symlink":
        Path(sentinel).write_text("keep me")
    passwd_links = os.stat("/etc/passwd").st_nlink
    layer = tar_layer(MALICIOUS_LAYERS[kind](sentinel), raw_names=True)
    image = build_and_push(registry, unique(f"pyrio/evil-{kind}"), "v1", layers=[tar_layer([File("ok", b"fine")]), layer])
    before = store_snapshot(stack)
    error = pull_error(stack, image.reference)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "refusing the layer" in error.details()
    if kind == "whiteout-through-symlink":
        assert Path(sentinel).read_text() == "keep me"
    else:
        assert not os.path.lexists(sentinel)
    assert os.stat("/etc/passwd").st_nlink == passwd_links
    after = store_snapshot(stack)
    # The harmless first layer may stay (it is shared content, collected later); nothing else.
    assert after["images"] == before["images"] and after["tmp"] == []
    assert set(after["layers"]) - set(before["layers"]) <= {image.config["rootfs"]["diff_ids"][0].split(":")[1]}


# --- root filesystems ------------------------------------------------------------------


def whiteout_image(registry: Registry) -> PushedImage:
    base = tar_layer([
        Dir("data"), File("data/a", b"a"), File("data/b", b"b"), Dir("opt"), Dir("opt/x"), File("opt/x/old1", b"old1"),
        Dir("opt/x/sub"), File("opt/x/sub/old2", b"old2"), File("keep", b"keep"), File("gone", b"gone"),
        Dir("dir-gone"), File("dir-gone/inner", b"inner"),
    ])
    middle = tar_layer([
        Whiteout("data/a"), Opaque("opt/x"), File("opt/x/new", b"new"), Whiteout("dir-gone"), Whiteout("gone"),
        File("hard-src", b"linked"), Hardlink("hard-dst", "hard-src"), Symlink("link", "/keep"),
        File("mode", b"m", mode=0o4750, uid=1000, gid=1000), Device("null", "char", 1, 3), Device("fifo", "fifo"),
    ])
    top = tar_layer([File("gone", b"back again"), File("data/c", b"c")])
    return build_and_push(registry, unique("pyrio/whiteouts"), "v1", layers=[base, middle, top])


def test_overlay_rootfs_shows_exactly_the_layers(stack: Stack, registry: Registry, imaged: RpcClient, rootfs_cleanup: list[str]) -> None:
    image = whiteout_image(registry)
    pull(stack, image.reference)
    container_id = uuid.uuid4().hex * 2
    rootfs_cleanup.append(container_id)
    answer = imaged.call("rootfs.prepare", {"container_id": container_id, "image": image.config_digest})
    merged = Path(answer["rootfs"])
    assert answer["image_id"] == image.config_digest
    assert answer["image_name"] == image.reference
    assert answer["repo_digest"] == image.digest_reference
    assert "Env" in answer["config"]
    found = tree(merged)
    assert found == {
        "data": "dir", "data/b": "b", "data/c": "c", "opt": "dir", "opt/x": "dir", "opt/x/new": "new",
        "keep": "keep", "gone": "back again", "hard-src": "linked", "hard-dst": "linked", "link": "-> /keep",
        "mode": "m", "null": "special", "fifo": "special",
    }
    assert os.stat(merged / "hard-src").st_ino == os.stat(merged / "hard-dst").st_ino
    mode_info = os.stat(merged / "mode")
    assert (mode_info.st_mode & 0o7777, mode_info.st_uid, mode_info.st_gid) == (0o4750, 1000, 1000)
    assert os.major(os.stat(merged / "null").st_rdev) == 1
    # Idempotent per container id.
    assert imaged.call("rootfs.prepare", {"container_id": container_id, "image": image.reference})["rootfs"] == str(merged)
    (merged / "written").write_bytes(b"x" * 100_000)
    usage = imaged.call("rootfs.usage", {"container_id": container_id})
    assert usage["used_bytes"] >= 100_000 and usage["inodes_used"] >= 1
    imaged.call("rootfs.remove", {"container_id": container_id})
    assert not os.path.ismount(merged) and not merged.exists()
    imaged.call("rootfs.remove", {"container_id": container_id})  # idempotent


def test_image_in_use_is_kept(stack: Stack, registry: Registry, imaged: RpcClient, rootfs_cleanup: list[str]) -> None:
    image = build_and_push(registry, unique("pyrio/inuse"), "v1", layers=[tar_layer([File("in-use", b"yes")])])
    pull(stack, image.reference)
    container_id = uuid.uuid4().hex * 2
    rootfs_cleanup.append(container_id)
    imaged.call("rootfs.prepare", {"container_id": container_id, "image": image.reference})
    with pytest.raises(grpc.RpcError) as caught:
        remove(stack, image.config_digest)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "in use by container" in caught.value.details() and container_id[:12] in caught.value.details()
    # By tag: the tag goes, the image stays for its container.
    remove(stack, image.reference)
    kept = status(stack, image.config_digest).image
    assert kept.id == image.config_digest and list(kept.repo_tags) == []
    imaged.call("rootfs.remove", {"container_id": container_id})
    remove(stack, image.config_digest)
    assert not status(stack, image.config_digest).HasField("image")
    diff_id = image.config["rootfs"]["diff_ids"][0]
    assert diff_id.split(":")[1] not in os.listdir(store_dir(stack) / "layers")


def test_rootfs_of_unknown_image_is_not_found(stack: Stack, imaged: RpcClient) -> None:
    from common.errors import InvalidArgument, NotFound

    with pytest.raises(NotFound):
        imaged.call("rootfs.prepare", {"container_id": "c" * 64, "image": "sha256:" + "1" * 64})
    with pytest.raises(InvalidArgument):
        imaged.call("rootfs.prepare", {"container_id": "../escape", "image": "busybox"})
    assert imaged.call("rootfs.list") == [] or all(item["container_id"] != "c" * 64 for item in imaged.call("rootfs.list"))


def test_many_layers_mount(stack: Stack, registry: Registry, imaged: RpcClient, rootfs_cleanup: list[str]) -> None:
    count = 60  # absolute lowerdir paths of 60 layers do not fit one page of mount options
    layers = [tar_layer([File(f"layer-{index:02d}", str(index).encode())]) for index in range(count)]
    image = build_and_push(registry, unique("pyrio/many"), "v1", layers=layers)
    pull(stack, image.reference)
    container_id = uuid.uuid4().hex * 2
    rootfs_cleanup.append(container_id)
    merged = Path(imaged.call("rootfs.prepare", {"container_id": container_id, "image": image.reference})["rootfs"])
    assert sorted(os.listdir(merged)) == [f"layer-{index:02d}" for index in range(count)]


def test_shared_layers_are_kept_until_the_last_image_goes(stack: Stack, registry: Registry) -> None:
    shared = tar_layer([File("shared", os.urandom(1000))])
    first = build_and_push(registry, unique("pyrio/shared-a"), "v1", layers=[shared, tar_layer([File("a", b"a")])])
    second = build_and_push(registry, unique("pyrio/shared-b"), "v1", layers=[shared, tar_layer([File("b", b"b")])])
    pull(stack, first.reference)
    pull(stack, second.reference)
    shared_hex = first.config["rootfs"]["diff_ids"][0].split(":")[1]
    remove(stack, first.reference)
    assert shared_hex in os.listdir(store_dir(stack) / "layers")
    remove(stack, second.reference)
    assert shared_hex not in os.listdir(store_dir(stack) / "layers")


def test_tag_moves_to_the_newly_pulled_image(stack: Stack, registry: Registry) -> None:
    repository = unique("pyrio/moving")
    old = build_and_push(registry, repository, "latest", layers=[tar_layer([File("version", b"1")])])
    pull(stack, old.reference)
    new = build_and_push(registry, repository, "latest", layers=[tar_layer([File("version", b"2")])])
    pull(stack, new.reference)
    assert status(stack, new.reference).image.id == new.config_digest
    assert list(status(stack, old.config_digest).image.repo_tags) == []
    remove(stack, old.config_digest)
    remove(stack, new.reference)


def test_shared_busybox_image_works(pulled_busybox: PushedImage, imaged: RpcClient, rootfs_cleanup: list[str]) -> None:
    """The image other areas build on: a shell, applets and an `app` user."""
    import subprocess

    container_id = uuid.uuid4().hex * 2
    rootfs_cleanup.append(container_id)
    answer = imaged.call("rootfs.prepare", {"container_id": container_id, "image": pulled_busybox.reference})
    assert answer["config"]["Cmd"] == ["sh"]
    result = subprocess.run(
        ["chroot", answer["rootfs"], "/bin/sh", "-c", "echo hello; id app; cat /etc/group | grep app; ls /bin/nc /bin/sleep"],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert "hello" in result.stdout and "uid=1000(app) gid=1000(app)" in result.stdout


def test_a_damaged_store_heals_on_the_next_pull(stack: Stack, registry: Registry, imaged: RpcClient, rootfs_cleanup: list[str]) -> None:
    import shutil

    from common.errors import FailedPrecondition

    image = build_and_push(registry, unique("pyrio/heal"), "v1", layers=[tar_layer([File("healed", b"yes")])])
    pull(stack, image.reference)
    diff_hex = image.config["rootfs"]["diff_ids"][0].split(":")[1]
    shutil.rmtree(store_dir(stack) / "layers" / diff_hex)  # as a disk fault or an operator would
    container_id = uuid.uuid4().hex * 2
    with pytest.raises(FailedPrecondition, match="incomplete.*pull it again"):
        imaged.call("rootfs.prepare", {"container_id": container_id, "image": image.reference})
    pull(stack, image.reference)
    rootfs_cleanup.append(container_id)
    merged = Path(imaged.call("rootfs.prepare", {"container_id": container_id, "image": image.reference})["rootfs"])
    assert (merged / "healed").read_text() == "yes"
