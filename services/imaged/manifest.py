"""Manifests: media types, digest checks, and platform selection in indexes."""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass
from typing import Any

from common.errors import FailedPrecondition, NotFound

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws")
IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
# Schema 1 is asked for only so that it can be refused with a clear error
# instead of a registry silently converting or answering 404.
ACCEPT = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST, *DOCKER_SCHEMA1]

GZIP_LAYERS = (
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
ZSTD_LAYERS = ("application/vnd.oci.image.layer.v1.tar+zstd", "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")
PLAIN_LAYERS = ("application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.nondistributable.v1.tar")
LAYER_TYPES = GZIP_LAYERS + ZSTD_LAYERS + PLAIN_LAYERS

_DIGEST = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
                  "armv6l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
                  "riscv64": "riscv64"}
_VARIANTS = {"armv7l": "v7", "armv6l": "v6", "aarch64": "v8"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def node_platform() -> Platform:
    machine = platform.machine()
    return Platform("linux", _ARCHITECTURES.get(machine, machine), _VARIANTS.get(machine, ""))


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def verify_manifest_digest(body: bytes, expected: str, what: str) -> str:
    """The manifest's digest; FailedPrecondition if it is not `expected`."""
    algorithm = expected.partition(":")[0] if expected else "sha256"
    if algorithm not in ("sha256", "sha512"):
        algorithm = "sha256"
    actual = compute_digest(body, algorithm)
    if expected and actual != expected:
        raise FailedPrecondition(
            f"{what}: digest mismatch, content is {actual} but {expected} was expected; nothing was stored"
        )
    return actual if algorithm == "sha256" or not expected else expected


def parse_manifest(body: bytes, media_type: str, what: str) -> tuple[str, dict[str, Any]]:
    """(media type, document). The media type in the body wins over the
    Content-Type header, which some registries get wrong."""
    try:
        document = json.loads(body)
    except ValueError:
        raise FailedPrecondition(f"{what}: the registry sent a manifest that is not JSON") from None
    if not isinstance(document, dict):
        raise FailedPrecondition(f"{what}: the manifest is not a JSON object")
    declared = document.get("mediaType") or media_type
    if document.get("schemaVersion") == 1 or declared in DOCKER_SCHEMA1:
        raise FailedPrecondition(
            f"{what} is a Docker schema 1 manifest, which pyrio does not support (deprecated and unsigned); "
            "push the image again with a current client to get a schema 2 or OCI manifest"
        )
    if declared not in IMAGE_MANIFESTS + INDEXES:
        if "manifests" in document:
            declared = OCI_INDEX
        elif "layers" in document and "config" in document:
            declared = OCI_MANIFEST
        else:
            raise FailedPrecondition(f"{what}: unsupported manifest media type {declared!r}")
    return declared, document


def select_platform(index: dict[str, Any], wanted: Platform, what: str) -> dict[str, Any]:
    """The index entry for this node's platform, as containerd matches:
    same os and architecture, then the variant if the node has one."""
    candidates = []
    seen = []
    for entry in index.get("manifests") or []:
        if not isinstance(entry, dict) or not _DIGEST.match(str(entry.get("digest", ""))):
            continue
        entry_platform = entry.get("platform") or {}
        seen.append(str(Platform(entry_platform.get("os", "?"), entry_platform.get("architecture", "?"), entry_platform.get("variant", ""))))
        if entry_platform.get("os") != wanted.os or entry_platform.get("architecture") != wanted.architecture:
            continue
        if entry.get("mediaType") not in IMAGE_MANIFESTS and entry.get("mediaType"):
            continue
        candidates.append(entry)
    if wanted.variant:
        exact = [entry for entry in candidates if (entry.get("platform") or {}).get("variant", "") == wanted.variant]
        candidates = exact or [entry for entry in candidates if not (entry.get("platform") or {}).get("variant")] or candidates
    if not candidates:
        raise NotFound(f"{what}: no image for platform {wanted} in the index (it has: {', '.join(seen) or 'nothing'})")
    return candidates[0]


def layer_descriptors(manifest: dict[str, Any], what: str) -> list[dict[str, Any]]:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise FailedPrecondition(f"{what}: manifest has no layers list")
    for layer in layers:
        if not isinstance(layer, dict) or not _DIGEST.match(str(layer.get("digest", ""))):
            raise FailedPrecondition(f"{what}: a layer descriptor has no valid digest")
        if layer.get("mediaType") not in LAYER_TYPES:
            raise FailedPrecondition(f"{what}: unsupported layer media type {layer.get('mediaType')!r}")
    return layers


def declared_size(descriptor: dict[str, Any], limit: int, limit_name: str, what: str) -> int:
    """The size a descriptor declares, which bounds the download: without
    one (or with 2^50) a registry could stream until the disk is full."""
    size = descriptor.get("size")
    digest = descriptor.get("digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FailedPrecondition(f"{what}: the descriptor of {digest} declares no valid size ({size!r}); refusing the image")
    if size > limit:
        raise FailedPrecondition(
            f"{what}: blob {digest} declares {size} bytes, more than the {limit} allowed ({limit_name}); refusing the image"
        )
    return size
