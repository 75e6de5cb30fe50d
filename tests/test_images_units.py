"""Unit tests of imaged's pure parts: references, manifests, auth headers, unpacking."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.config import RegistryConfig
from common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.imaged.manifest import Platform, parse_manifest, select_platform
from services.imaged.reference import parse_reference
from services.imaged.registry import Credentials, endpoints_for, parse_www_authenticate
from services.imaged.unpack import UnpackLimits, UnsafeLayer, unpack_layer
from tests.oci_images import Dir, File, Opaque, Symlink, Whiteout, compress, tar_layer


@pytest.mark.parametrize(
    "given, expected",
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("user/app:v1", "docker.io/user/app:v1"),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
        ("localhost/app", "localhost/app:latest"),
        ("127.0.0.1:5000/ns/sub/name:tag", "127.0.0.1:5000/ns/sub/name:tag"),
        ("quay.io/a/b@sha256:" + "a" * 64, "quay.io/a/b@sha256:" + "a" * 64),
        ("quay.io/a/b:t@sha256:" + "a" * 64, "quay.io/a/b:t@sha256:" + "a" * 64),
    ],
)
def test_reference_normalisation(given: str, expected: str) -> None:
    assert str(parse_reference(given)) == expected


@pytest.mark.parametrize("bad", ["", "upper/Name", "name:", "name:tag with space", "name@sha256:abc", "a//b", "-lead"])
def test_invalid_references(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(bad)


def test_schema1_is_refused_clearly() -> None:
    body = json.dumps({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}).encode()
    with pytest.raises(FailedPrecondition, match="schema 1"):
        parse_manifest(body, "application/vnd.docker.distribution.manifest.v1+prettyjws", "image x")


def test_platform_selection_prefers_the_variant() -> None:
    v6, v7 = "sha256:" + "6" * 64, "sha256:" + "7" * 64
    index = {"manifests": [
        {"digest": v6, "mediaType": "application/vnd.oci.image.manifest.v1+json", "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
        {"digest": v7, "mediaType": "application/vnd.oci.image.manifest.v1+json", "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
    ]}
    assert select_platform(index, Platform("linux", "arm", "v7"), "x")["digest"] == v7
    with pytest.raises(NotFound, match="linux/amd64"):
        select_platform(index, Platform("linux", "amd64"), "x")


def test_www_authenticate_parsing() -> None:
    challenge = parse_www_authenticate('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"')
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:a/b:pull,push"}
    assert parse_www_authenticate('Basic realm="x"').scheme == "basic"


def test_credentials_from_cri_auth() -> None:
    import base64

    decoded = Credentials.from_cri({"auth": base64.b64encode(b"user:pa:ss").decode()})
    assert (decoded.username, decoded.password) == ("user", "pa:ss")
    assert Credentials.from_cri(None).empty


def test_endpoints_mirrors_then_upstream_and_plain_http_rules() -> None:
    registries = {"docker.io": RegistryConfig(mirrors=["mirror.example:5000/cache", "127.0.0.1:5001"]),
                  "insecure.example": RegistryConfig(insecure=True)}
    endpoints = endpoints_for(parse_reference("busybox"), registries)
    assert [(e.host, e.prefix, e.mirror) for e in endpoints] == [
        ("mirror.example:5000", "cache", True), ("127.0.0.1:5001", "", True), ("registry-1.docker.io", "", False)]
    assert endpoints[0].schemes == ("https",) and endpoints[1].schemes == ("https", "http")
    insecure = endpoints_for(parse_reference("insecure.example/app"), registries)[-1]
    assert insecure.schemes == ("https", "http") and not insecure.verify_tls
    assert endpoints_for(parse_reference("quay.io/a/b"), registries)[-1].schemes == ("https",)


def _unpack(tmp_path: Path, entries: list, compression: str = "gzip") -> Path:
    blob = tmp_path / "blob"
    blob.write_bytes(compress(tar_layer(entries, raw_names=True), compression))
    target = tmp_path / "layer"
    target.mkdir()
    unpack_layer(str(blob), str(target), "sha256:test", UnpackLimits(1 << 30))
    return target


def test_unpack_converts_whiteouts_for_overlayfs(tmp_path: Path) -> None:
    target = _unpack(tmp_path, [Dir("d"), Whiteout("d/gone"), Opaque("o"), File("o/f", b"x", xattrs={"user.note": "kept"})], "zstd")
    gone = os.lstat(target / "d" / "gone")
    assert os.major(gone.st_rdev) == 0 and os.minor(gone.st_rdev) == 0
    assert os.getxattr(target / "o", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(target / "o" / "f", "user.note") == b"kept"


def test_unpack_refuses_forged_overlay_xattrs_silently_and_unsafe_paths(tmp_path: Path) -> None:
    target = _unpack(tmp_path, [File("f", b"x", xattrs={"trusted.overlay.redirect": "/etc"})])
    assert "trusted.overlay.redirect" not in os.listxattr(target / "f")
    second = tmp_path / "second"
    second.mkdir()
    with pytest.raises(UnsafeLayer):
        _unpack(second, [Symlink("s", "/"), File("s/etc/evil", b"x")])


def test_unpack_diff_id_covers_the_whole_tar(tmp_path: Path) -> None:
    import hashlib

    tar = tar_layer([File("a", b"a")])
    blob = tmp_path / "blob"
    blob.write_bytes(compress(tar, "gzip"))
    target = tmp_path / "layer"
    target.mkdir()
    diff_id, size = unpack_layer(str(blob), str(target), "sha256:test", UnpackLimits(1 << 30))
    assert diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() and size == len(tar)


def test_download_slots_leave_room_for_other_registries_and_give_up_when_unwanted() -> None:
    import threading

    from services.imaged.transfer import Cancelled, DownloadSlots, per_registry_cap

    assert [per_registry_cap(total, 0) for total in (1, 2, 3)] == [1, 1, 2]
    assert per_registry_cap(3, 5) == 3
    slots = DownloadSlots(total=2, per_registry=1)
    with slots.slot("slow.example", lambda: "", "layer a"):
        # The same registry must wait; a waiter nobody needs any more gives up.
        with pytest.raises(Cancelled, match="caller gone .it was waiting for a download slot."):
            with slots.slot("slow.example", lambda: "caller gone", "layer b"):
                pass
        # Another registry gets the free slot at once.
        with slots.slot("good.example", lambda: "", "layer c"):
            assert slots.active("good.example") == 1
        acquired, release = threading.Event(), threading.Event()

        def hold() -> None:
            with slots.slot("slow.example", lambda: "", "layer d"):
                acquired.set()
                release.wait(10)

        waiter = threading.Thread(target=hold)
        waiter.start()
        assert not acquired.wait(0.3)  # held back by the per-registry cap
    # The first slow download ended: the waiting one gets its slot.
    assert acquired.wait(5) and slots.active("slow.example") == 1
    release.set()
    waiter.join(5)
    assert slots.active("slow.example") == 0


def test_rate_floor_fails_a_download_slower_than_the_minimum_over_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.errors import DeadlineExceeded
    from services.imaged import transfer

    now = [100.0]
    monkeypatch.setattr(transfer.time, "monotonic", lambda: now[0])
    floor = transfer.RateFloor(100, 3.0, "blob x", "127.0.0.1:1")
    for _ in range(3):
        now[0] += 1.0
        floor.count(1000)  # 1000 bytes/s: fine
    now[0] += 3.0
    with pytest.raises(DeadlineExceeded, match=r"download too slow, 1 bytes from 127.0.0.1:1 in the last 3s"):
        floor.count(1)
    transfer.RateFloor(0, 3.0, "blob y", "h").count(0)  # 0 turns the floor off
