"""Build OCI / Docker images in memory and push them to a test registry.

Nothing can be pulled from the internet, so tests make their own images
from /bin/busybox (busybox-static) and push them with plain HTTP (OCI
distribution API) to the local `docker-registry` the `registry` fixture
runs. Other areas reuse this: `push_busybox(registry)` gives a ready image
reference with a shell, common applets, /etc/passwd and /etc/group (root and
`app`, uid 1000).

    layer = tar_layer([File("etc/motd", b"hi"), Dir("data", mode=0o1777)])
    image = build_and_push(registry, "test/motd", "v1", layers=[busybox_layer(), layer],
                           config={"Env": ["A=1"], "Cmd": ["sh"]})
    image.reference   # "127.0.0.1:<port>/test/motd:v1"
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import ssl
import tarfile
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import zstandard

BUSYBOX_PATH = "/bin/busybox"
BUSYBOX_APPLETS = (
    "sh", "ash", "echo", "cat", "sleep", "ls", "id", "nc", "env", "true", "false", "printf", "test",
    "mkdir", "rm", "cp", "mv", "touch", "ps", "kill", "grep", "head", "tail", "wc", "stat", "hostname",
    "whoami", "date", "df", "du", "mount", "ip", "ifconfig", "ping", "wget", "sed", "awk", "tee", "uname",
    "chmod", "chown", "ln", "readlink", "find", "xargs", "dd", "yes", "seq", "sort", "uniq", "tr", "cut",
    "timeout", "nslookup", "httpd", "vi", "stty", "tty", "basename", "dirname", "pwd", "sync",
    "md5sum", "sha256sum", "base64", "hexdump", "od", "mktemp", "usleep", "pidof", "top", "free", "netstat",
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}


class RegistryLike(Protocol):
    """What the builder needs of a registry: its host:port and push credentials."""

    host: str

    def auth_header(self) -> str | None: ...


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- layer entries ----------------------------------------------------------


@dataclass
class File:
    path: str
    content: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass
class Symlink:
    path: str
    target: str


@dataclass
class Hardlink:
    path: str
    target: str


@dataclass
class Device:
    path: str
    kind: str = "char"  # or "block" or "fifo"
    major: int = 1
    minor: int = 3
    mode: int = 0o666


@dataclass
class Whiteout:
    """Deletes `path` from the layers below (`.wh.<name>` in the tar)."""

    path: str


@dataclass
class Opaque:
    """Hides everything the layers below have in directory `path` (`.wh..wh..opq`)."""

    path: str


Entry = File | Dir | Symlink | Hardlink | Device | Whiteout | Opaque


def _info(name: str, kind: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 1_700_000_000
    return info


def tar_layer(entries: Iterable[Entry], raw_names: bool = False) -> bytes:
    """An uncompressed layer tar. Names are used as given when `raw_names`
    (to build malicious layers); otherwise a leading "/" is dropped."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            name = entry.path if raw_names else entry.path.lstrip("/")
            if isinstance(entry, File):
                info = _info(name, tarfile.REGTYPE, entry.mode, entry.uid, entry.gid)
                info.size = len(entry.content)
                if entry.xattrs:
                    info.pax_headers = {f"SCHILY.xattr.{key}": value for key, value in entry.xattrs.items()}
                tar.addfile(info, io.BytesIO(entry.content))
            elif isinstance(entry, Dir):
                tar.addfile(_info(name, tarfile.DIRTYPE, entry.mode, entry.uid, entry.gid))
            elif isinstance(entry, Symlink):
                info = _info(name, tarfile.SYMTYPE, 0o777)
                info.linkname = entry.target
                tar.addfile(info)
            elif isinstance(entry, Hardlink):
                info = _info(name, tarfile.LNKTYPE)
                info.linkname = entry.target if raw_names else entry.target.lstrip("/")
                tar.addfile(info)
            elif isinstance(entry, Device):
                kind = {"char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[entry.kind]
                info = _info(name, kind, entry.mode)
                info.devmajor, info.devminor = entry.major, entry.minor
                tar.addfile(info)
            elif isinstance(entry, Whiteout):
                parent, _, base = name.rpartition("/")
                tar.addfile(_info(f"{parent}/.wh.{base}" if parent else f".wh.{base}", tarfile.REGTYPE))
            elif isinstance(entry, Opaque):
                tar.addfile(_info(f"{name.rstrip('/')}/.wh..wh..opq", tarfile.REGTYPE))
            else:  # pragma: no cover - a typo in a test
                raise TypeError(f"unknown layer entry {entry!r}")
    return buffer.getvalue()


def busybox_entries(extra_applets: Iterable[str] = ()) -> list[Entry]:
    """/bin/busybox, applet symlinks, the usual directories and users."""
    with open(BUSYBOX_PATH, "rb") as handle:
        busybox = handle.read()
    entries: list[Entry] = [Dir("bin"), File("bin/busybox", busybox, 0o755)]
    for applet in sorted(set(BUSYBOX_APPLETS) | set(extra_applets)):
        entries.append(Symlink(f"bin/{applet}", "/bin/busybox"))
    entries += [
        Dir("etc"),
        File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
             b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        File("etc/group", b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"),
        Dir("root", 0o700),
        Dir("home"),
        Dir("home/app", 0o755, 1000, 1000),
        Dir("tmp", 0o1777),
        Dir("var"),
        Dir("proc"),
        Dir("sys"),
        Dir("dev"),
        Dir("usr"),
        Dir("usr/bin"),
        Symlink("usr/bin/env", "/bin/busybox"),
    ]
    return entries


def busybox_layer() -> bytes:
    return tar_layer(busybox_entries())


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


# --- pushing ----------------------------------------------------------------


@dataclass
class Layer:
    """A layer as pushed: the tar, and how it was compressed."""

    tar: bytes
    compression: str = "gzip"

    @property
    def blob(self) -> bytes:
        return compress(self.tar, self.compression)

    @property
    def diff_id(self) -> str:
        return sha256_digest(self.tar)


@dataclass
class PushedImage:
    registry_host: str
    repository: str
    tag: str
    manifest_digest: str
    manifest: dict[str, Any]
    media_type: str
    config: dict[str, Any] | None = None
    config_digest: str = ""
    layer_digests: list[str] = field(default_factory=list)

    @property
    def reference(self) -> str:
        return f"{self.registry_host}/{self.repository}:{self.tag}"

    @property
    def digest_reference(self) -> str:
        return f"{self.registry_host}/{self.repository}@{self.manifest_digest}"

    @property
    def image_id(self) -> str:
        return self.config_digest


class RegistryPusher:
    """Plain-HTTP pushes with the distribution v2 API (monolithic uploads)."""

    def __init__(self, registry: RegistryLike) -> None:
        self.registry = registry

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.registry.host, timeout=60)
        all_headers = dict(headers or {})
        auth = self.registry.auth_header()
        if auth:
            all_headers["Authorization"] = auth
        try:
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, {key.lower(): value for key, value in response.getheaders()}, data
        finally:
            connection.close()

    def blob_exists(self, repository: str, digest: str) -> bool:
        status, _, _ = self._request("HEAD", f"/v2/{repository}/blobs/{digest}")
        return status == 200

    def push_blob(self, repository: str, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha256_digest(data)
        if self.blob_exists(repository, digest):
            return digest
        status, headers, body = self._request("POST", f"/v2/{repository}/blobs/uploads/")
        if status != 202:
            raise RuntimeError(f"starting upload to {repository}: HTTP {status} {body[:300]!r}")
        location = headers["location"]
        parsed = urllib.parse.urlsplit(location)
        query = urllib.parse.parse_qsl(parsed.query) + [("digest", digest)]
        path = f"{parsed.path}?{urllib.parse.urlencode(query)}"
        status, _, body = self._request(
            "PUT", path, body=data, headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        )
        if status != 201:
            raise RuntimeError(f"uploading blob {digest} to {repository}: HTTP {status} {body[:300]!r}")
        return digest

    def push_manifest(self, repository: str, reference: str, manifest: bytes, media_type: str) -> str:
        status, headers, body = self._request(
            "PUT", f"/v2/{repository}/manifests/{reference}", body=manifest, headers={"Content-Type": media_type}
        )
        if status != 201:
            raise RuntimeError(f"pushing manifest {repository}:{reference}: HTTP {status} {body[:500]!r}")
        return headers.get("docker-content-digest") or sha256_digest(manifest)

    def delete_manifest(self, repository: str, digest: str) -> None:
        self._request("DELETE", f"/v2/{repository}/manifests/{digest}")


def image_config(
    diff_ids: list[str],
    config: dict[str, Any] | None = None,
    architecture: str = "amd64",
    os_name: str = "linux",
    variant: str = "",
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "created": "2026-01-01T00:00:00Z",
        "architecture": architecture,
        "os": os_name,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], **(config or {})},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "pyrio tests"} for _ in diff_ids],
    }
    if variant:
        document["variant"] = variant
    return document


def build_and_push(
    registry: RegistryLike,
    name: str,
    tag: str,
    layers: list[bytes | Layer] | None = None,
    config: dict[str, Any] | None = None,
    architecture: str = "amd64",
    variant: str = "",
    media: str = "oci",
    compression: str = "gzip",
) -> PushedImage:
    """Push an image made of `layers` (tar bytes, or Layer to choose the
    compression per layer; default one busybox layer) and return what was
    pushed. `config` is the OCI config's `config` object (Env, Cmd, User...)."""
    pusher = RegistryPusher(registry)
    wrapped = [item if isinstance(item, Layer) else Layer(item, compression) for item in (layers or [busybox_layer()])]
    descriptors = []
    for layer in wrapped:
        blob = layer.blob
        digest = pusher.push_blob(name, blob)
        descriptors.append({"mediaType": LAYER_MEDIA_TYPES[(media, layer.compression)], "digest": digest, "size": len(blob)})
    config_document = image_config([layer.diff_id for layer in wrapped], config, architecture, variant=variant)
    config_bytes = json.dumps(config_document, sort_keys=True).encode()
    config_digest = pusher.push_blob(name, config_bytes)
    manifest_type = OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": OCI_CONFIG if media == "oci" else DOCKER_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": descriptors,
    }
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    manifest_digest = pusher.push_manifest(name, tag, manifest_bytes, manifest_type)
    return PushedImage(
        registry_host=registry.host,
        repository=name,
        tag=tag,
        manifest_digest=manifest_digest,
        manifest=manifest,
        media_type=manifest_type,
        config=config_document,
        config_digest=config_digest,
        layer_digests=[descriptor["digest"] for descriptor in descriptors],
    )


def push_index(
    registry: RegistryLike,
    name: str,
    tag: str,
    images: list[tuple[PushedImage, dict[str, str]]],
    media: str = "oci",
) -> PushedImage:
    """Push an image index (or Docker manifest list) of already pushed
    images of the same repository, each with its platform
    ({"os": "linux", "architecture": "arm64", "variant": "v8"})."""
    index_type = OCI_INDEX if media == "oci" else DOCKER_LIST
    index = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [
            {
                "mediaType": image.media_type,
                "digest": image.manifest_digest,
                "size": len(json.dumps(image.manifest, indent=1).encode()),
                "platform": platform,
            }
            for image, platform in images
        ],
    }
    index_bytes = json.dumps(index, indent=1).encode()
    digest = RegistryPusher(registry).push_manifest(name, tag, index_bytes, index_type)
    return PushedImage(registry.host, name, tag, digest, index, index_type)


def push_busybox(registry: RegistryLike, name: str = "busybox", tag: str = "latest", config: dict[str, Any] | None = None) -> PushedImage:
    """The standard test image: busybox with a shell and applets, root and
    `app` (uid 1000) users; its default command is `sh`."""
    return build_and_push(registry, name, tag, layers=[busybox_layer()], config={"Cmd": ["sh"], **(config or {})})


def basic_auth_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def wait_for_registry(host: str, timeout: float = 20.0, tls: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if tls:
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, timeout=2, context=ssl._create_unverified_context()
                )
            else:
                connection = http.client.HTTPConnection(host, timeout=2)
            connection.request("GET", "/v2/")
            status = connection.getresponse().status
            connection.close()
            if status in (200, 401):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"registry at {host} did not come up")
        time.sleep(0.05)
