"""Image references: parsing and normalising them as CRI-O and Docker do.

`busybox` is `docker.io/library/busybox:latest`; `host:port/ns/name:tag`,
`name@sha256:<hex>` and `name:tag@sha256:<hex>` are accepted. A reference
with a digest is pulled by that digest (the tag is then informational).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]+)?$"
    r"|^\[[0-9a-fA-F:.]+\](?::[0-9]+)?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_HEX_ID = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def repository(self) -> str:
        """`docker.io/library/busybox`: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def endpoint_reference(self) -> str:
        """What to ask the registry for: the digest when there is one."""
        return self.digest or self.tag

    def tagged(self) -> str:
        return f"{self.repository}:{self.tag}" if self.tag else ""

    def with_digest(self, digest: str) -> str:
        return f"{self.repository}@{digest}"

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def validate_digest(digest: str) -> str:
    if not _DIGEST.match(digest):
        raise InvalidArgument(f"invalid digest {digest!r}: expected sha256:<64 hex> or sha512:<128 hex>")
    return digest


def is_image_id(text: str) -> bool:
    """A full image id: `sha256:<64 hex>` or the bare 64 hex."""
    return bool(_HEX_ID.match(text.removeprefix("sha256:"))) and (text.startswith("sha256:") or len(text) == 64)


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain = first
    else:
        domain, rest = DEFAULT_DOMAIN, name
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in rest:
        rest = f"library/{rest}"
    return domain, rest


def parse_reference(text: str) -> Reference:
    """Parse and normalise a reference; InvalidArgument says what is wrong."""
    original = text
    text = text.strip()
    if not text:
        raise InvalidArgument("image reference must not be empty")
    if len(text) > 512:
        raise InvalidArgument(f"image reference is too long ({len(text)} characters)")
    digest = ""
    if "@" in text:
        text, _, digest = text.partition("@")
        validate_digest(digest)
    tag = ""
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidArgument(f"invalid tag {tag!r} in image reference {original!r}")
    domain, path = _split_domain(text)
    if not _DOMAIN.match(domain):
        raise InvalidArgument(f"invalid registry host {domain!r} in image reference {original!r}")
    for component in path.split("/"):
        if not _COMPONENT.match(component):
            raise InvalidArgument(
                f"invalid image reference {original!r}: repository name component {component!r} "
                "must be lowercase letters, digits and separators"
            )
    if not tag and not digest:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def registry_endpoint_host(domain: str) -> str:
    """The host to talk to for a registry domain (Docker Hub's API lives elsewhere)."""
    return DOCKER_HUB_ENDPOINT if domain == DEFAULT_DOMAIN else domain
