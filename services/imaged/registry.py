"""A client of the OCI distribution API (Docker Registry HTTP API v2).

It speaks plain http.client rather than a third-party HTTP library: pulls
need only GET of manifests and blobs, streamed to disk with a read timeout
(the "no progress for N seconds" detector is the socket timeout), plus the
two auth schemes. Blob bodies are never held in memory.

Endpoints: mirrors first (each keeps the repository path), then the
registry itself. HTTPS by default; registries configured `insecure` and
those on localhost / 127.0.0.0/8 also accept plain HTTP, as Docker allows.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from common.config import RegistryConfig
from common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PyrioError,
    Unauthenticated,
    Unavailable,
)
from services.imaged.reference import Reference, registry_endpoint_host
from services.imaged.transfer import Cancelled, RateFloor

log = logging.getLogger("pyrio.imaged.registry")

CHUNK_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20
MAX_REDIRECTS = 5
USER_AGENT = "pyrio/0.1"


@dataclass
class Credentials:
    """The CRI AuthConfig, decoded."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    @classmethod
    def from_cri(cls, auth: dict[str, Any] | None) -> "Credentials":
        auth = auth or {}
        username, password = auth.get("username", ""), auth.get("password", "")
        if auth.get("auth") and not username:
            try:
                decoded = base64.b64decode(auth["auth"]).decode()
            except ValueError:
                raise InvalidArgument("auth.auth must be base64 of \"username:password\"") from None
            username, _, password = decoded.partition(":")
        return cls(username, password, auth.get("identity_token", ""), auth.get("registry_token", ""))

    @property
    def empty(self) -> bool:
        return not (self.username or self.identity_token or self.registry_token)

    def fingerprint(self) -> str:
        material = "\0".join((self.username, self.password, self.identity_token, self.registry_token))
        return hashlib.sha256(material.encode()).hexdigest()[:16]


@dataclass
class Endpoint:
    host: str
    # The repository path prefix a mirror serves under ("" for most).
    prefix: str = ""
    schemes: tuple[str, ...] = ("https",)
    verify_tls: bool = True
    ca_file: str = ""
    mirror: bool = False


def _is_local(host: str) -> bool:
    hostname = urllib.parse.urlsplit(f"//{host}").hostname or ""
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def make_endpoint(host_and_prefix: str, registries: dict[str, RegistryConfig], mirror: bool) -> Endpoint:
    host, _, prefix = host_and_prefix.partition("/")
    settings = registries.get(host) or registries.get(host_and_prefix) or RegistryConfig()
    plain_allowed = settings.insecure or _is_local(host)
    return Endpoint(
        host=host,
        prefix=prefix.strip("/"),
        schemes=("https", "http") if plain_allowed else ("https",),
        verify_tls=not settings.insecure,
        ca_file=settings.ca_file,
        mirror=mirror,
    )


def endpoints_for(reference: Reference, registries: dict[str, RegistryConfig]) -> list[Endpoint]:
    """Mirrors of the reference's registry in order, then the registry itself."""
    settings = registries.get(reference.domain) or RegistryConfig()
    endpoints = [make_endpoint(mirror, registries, mirror=True) for mirror in settings.mirrors]
    upstream = make_endpoint(registry_endpoint_host(reference.domain), registries, mirror=False)
    upstream.verify_tls, upstream.ca_file = not settings.insecure, settings.ca_file
    if settings.insecure:
        upstream.schemes = ("https", "http")
    endpoints.append(upstream)
    return endpoints


@dataclass
class _Challenge:
    scheme: str  # "basic", "bearer" or "" (anonymous access allowed)
    params: dict[str, str] = field(default_factory=dict)


def parse_www_authenticate(header: str) -> _Challenge:
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        while position < len(rest) and rest[position] in " ,":
            position += 1
        equals = rest.find("=", position)
        if equals < 0:
            break
        key = rest[position:equals].strip().lower()
        position = equals + 1
        if position < len(rest) and rest[position] == '"':
            end = position + 1
            value_chars = []
            while end < len(rest) and rest[end] != '"':
                if rest[end] == "\\" and end + 1 < len(rest):
                    end += 1
                value_chars.append(rest[end])
                end += 1
            params[key] = "".join(value_chars)
            position = end + 1
        else:
            end = rest.find(",", position)
            end = len(rest) if end < 0 else end
            params[key] = rest[position:end].strip()
            position = end
    return _Challenge(scheme.lower(), params)


def _registry_error_message(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{error.get('code', '')}: {error.get('message', '')}".strip(": ") for error in errors)
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace").strip()


class RegistryClient:
    """Talks to one endpoint about one repository, for one pull."""

    def __init__(
        self,
        endpoint: Endpoint,
        repository_path: str,
        credentials: Credentials,
        progress_timeout: float,
        min_rate: int = 0,
        rate_window: float = 60.0,
    ) -> None:
        self.endpoint = endpoint
        self.min_rate = min_rate
        self.rate_window = rate_window
        self.repository = f"{endpoint.prefix}/{repository_path}" if endpoint.prefix else repository_path
        self.credentials = credentials
        self.timeout = progress_timeout
        self.scheme = ""
        self._challenge: _Challenge | None = None
        self._token = ""
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None

    @property
    def name(self) -> str:
        return f"{self.endpoint.host}/{self.repository}"

    # --- connections -----------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if not self.endpoint.verify_tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(cafile=self.endpoint.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise FailedPrecondition(
                f"registry {self.endpoint.host}: cannot load its ca_file {self.endpoint.ca_file!r}: {exc}"
            ) from None

    def _connection(self, scheme: str, host: str) -> http.client.HTTPConnection:
        if scheme == "https":
            if self._tls is None:
                self._tls = self._ssl_context()
            return http.client.HTTPSConnection(host, timeout=self.timeout, context=self._tls)
        return http.client.HTTPConnection(host, timeout=self.timeout)

    def _send(self, method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> http.client.HTTPResponse:
        """One request, following redirects; the Authorization header is
        only sent to the host it was meant for (never along a redirect to
        blob storage elsewhere)."""
        auth_host = urllib.parse.urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            connection = self._connection(parts.scheme, parts.netloc)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            send_headers = {"User-Agent": USER_AGENT, **headers}
            if parts.netloc != auth_host:
                send_headers.pop("Authorization", None)
            try:
                connection.request(method, path, body=body, headers=send_headers)
                response = connection.getresponse()
            except socket.timeout:
                connection.close()
                raise DeadlineExceeded(f"registry {parts.netloc} did not answer within {self.timeout:g}s") from None
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                raise Unavailable(f"cannot reach registry {parts.netloc}: {exc}") from None
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                response.read()
                connection.close()
                continue
            return response
        raise Unavailable(f"registry {self.endpoint.host}: too many redirects")

    def _ping(self) -> None:
        """Find the scheme that works and the auth challenge (GET /v2/)."""
        errors = []
        for scheme in self.endpoint.schemes:
            try:
                response = self._send("GET", f"{scheme}://{self.endpoint.host}/v2/", {})
            except PyrioError as exc:
                errors.append(f"{scheme}: {exc}")
                continue
            body = response.read(64 * 1024)
            response.close()
            if response.status == 401:
                header = response.getheader("WWW-Authenticate") or ""
                self._challenge = parse_www_authenticate(header)
            elif response.status in (200, 404) or 200 <= response.status < 300:
                # 404: not a v2 registry root, but some mirrors answer so; try anyway.
                self._challenge = _Challenge("")
            else:
                errors.append(f"{scheme}: HTTP {response.status} {_registry_error_message(body)}")
                continue
            self.scheme = scheme
            return
        raise Unavailable(f"registry {self.endpoint.host} is not reachable: {'; '.join(errors)}")

    # --- auth ------------------------------------------------------------

    def _scope(self) -> str:
        return f"repository:{self.repository}:pull"

    def _fetch_token(self, challenge: _Challenge) -> str:
        if self.credentials.registry_token:
            return self.credentials.registry_token
        realm = challenge.params.get("realm", "")
        if not realm:
            raise Unauthenticated(f"registry {self.endpoint.host} asked for a bearer token without naming a realm")
        # Always our own scope: the /v2/ ping's challenge names none.
        query = {"scope": self._scope()}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        if self.credentials.identity_token:
            body = urllib.parse.urlencode(
                {**query, "grant_type": "refresh_token", "refresh_token": self.credentials.identity_token, "client_id": "pyrio"}
            ).encode()
            response = self._send("POST", realm, {"Content-Type": "application/x-www-form-urlencoded"}, body)
        else:
            headers = {}
            if self.credentials.username:
                headers["Authorization"] = self._basic()
            separator = "&" if urllib.parse.urlsplit(realm).query else "?"
            response = self._send("GET", realm + separator + urllib.parse.urlencode(query), headers)
        data = response.read(1 << 20)
        response.close()
        if response.status in (401, 403):
            raise Unauthenticated(
                f"pulling {self.name}: the token server {urllib.parse.urlsplit(realm).netloc} refused "
                + ("the given credentials" if not self.credentials.empty else "anonymous access; credentials are required")
                + f" (HTTP {response.status})"
            )
        if response.status != 200:
            raise Unavailable(f"token server {realm}: HTTP {response.status} {_registry_error_message(data)}")
        try:
            answer = json.loads(data)
            return answer.get("token") or answer["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise Unavailable(f"token server {realm} answered without a token") from None

    def _basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.credentials.username}:{self.credentials.password}".encode()).decode()

    def _auth_header(self) -> dict[str, str]:
        challenge = self._challenge
        if challenge is None or not challenge.scheme:
            return {}
        if challenge.scheme == "basic":
            return {"Authorization": self._basic()} if self.credentials.username else {}
        if challenge.scheme == "bearer":
            with self._lock:
                if not self._token:
                    self._token = self._fetch_token(challenge)
                return {"Authorization": f"Bearer {self._token}"}
        raise Unauthenticated(f"registry {self.endpoint.host} wants unsupported auth scheme {challenge.scheme!r}")

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        """An authenticated request. A 401 with a bearer token we already hold
        (expired, or the registry wants another scope) gets one fresh token."""
        if not self.scheme:
            self._ping()
        url = f"{self.scheme}://{self.endpoint.host}{path}"
        response = self._send(method, url, {**(headers or {}), **self._auth_header()})
        refreshable = self._token and not self.credentials.registry_token
        if response.status == 401 and refreshable and response.getheader("WWW-Authenticate"):
            challenge = parse_www_authenticate(response.getheader("WWW-Authenticate") or "")
            response.read()
            response.close()
            with self._lock:
                self._challenge, self._token = challenge, ""
            response = self._send(method, url, {**(headers or {}), **self._auth_header()})
        return response

    def _raise_for_status(self, response: http.client.HTTPResponse, what: str) -> None:
        if 200 <= response.status < 300:
            return
        body = response.read(64 * 1024)
        response.close()
        detail = _registry_error_message(body)
        if response.status == 401:
            if self.credentials.empty:
                raise Unauthenticated(f"{what}: registry {self.endpoint.host} requires authentication and no credentials were given ({detail})")
            raise Unauthenticated(f"{what}: registry {self.endpoint.host} rejected the credentials ({detail})")
        if response.status == 403:
            raise PermissionDenied(f"{what}: access denied by registry {self.endpoint.host} ({detail})")
        if response.status == 404:
            raise NotFound(f"{what}: not found on registry {self.endpoint.host} ({detail})")
        if response.status == 429 or response.status >= 500:
            raise Unavailable(f"{what}: registry {self.endpoint.host} answered HTTP {response.status} ({detail})")
        raise FailedPrecondition(f"{what}: registry {self.endpoint.host} answered HTTP {response.status} ({detail})")

    # --- API -------------------------------------------------------------

    def get_manifest(self, reference: str, accept: list[str]) -> tuple[bytes, str, str]:
        """(body, media type, Docker-Content-Digest header or "")."""
        what = f"manifest {self.name}:{reference}" if not reference.startswith("sha") else f"manifest {self.name}@{reference}"
        response = self.request("GET", f"/v2/{self.repository}/manifests/{reference}", {"Accept": ", ".join(accept)})
        self._raise_for_status(response, what)
        length = int(response.getheader("Content-Length") or 0)
        if length > MAX_MANIFEST_BYTES:
            response.close()
            raise FailedPrecondition(f"{what} is {length} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
        floor = RateFloor(self.min_rate, self.rate_window, what, self.endpoint.host)
        parts: list[bytes] = []
        received = 0
        try:
            while received <= MAX_MANIFEST_BYTES and (chunk := response.read1(CHUNK_BYTES)):
                parts.append(chunk)
                received += len(chunk)
                floor.count(len(chunk))
            body = b"".join(parts)
        except socket.timeout:
            raise DeadlineExceeded(f"{what}: no data from {self.endpoint.host} for {self.timeout:g}s") from None
        finally:
            response.close()
        if len(body) > MAX_MANIFEST_BYTES:
            raise FailedPrecondition(f"{what} is larger than the {MAX_MANIFEST_BYTES} bytes allowed")
        media_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
        return body, media_type, response.getheader("Docker-Content-Digest") or ""

    def download_blob(
        self,
        digest: str,
        destination: BinaryIO,
        expected_size: int | None = None,
        cancelled: Callable[[], str] = lambda: "",
    ) -> int:
        """Stream a blob into `destination`, verifying size and digest;
        returns its size. Raises FailedPrecondition on a digest mismatch, so
        the caller must discard what was written unless this returns.
        `cancelled` says why the blob is no longer wanted ("" while it is).

        Reads take what has arrived (read1), so a registry dribbling bytes
        is seen at once by the rate floor and the cancellation check rather
        than after a whole chunk."""
        algorithm, _, expected_hex = digest.partition(":")
        if algorithm not in ("sha256", "sha512"):
            raise FailedPrecondition(f"blob {digest}: unsupported digest algorithm {algorithm!r}")
        hasher = hashlib.new(algorithm)
        what = f"blob {digest} of {self.name}"
        response = self.request("GET", f"/v2/{self.repository}/blobs/{digest}")
        self._raise_for_status(response, what)
        announced = response.getheader("Content-Length")
        if expected_size is not None and announced is not None and announced.isdigit() and int(announced) > expected_size:
            response.close()
            raise FailedPrecondition(
                f"{what}: size mismatch, the registry announces {announced} bytes, the manifest declares "
                f"{expected_size}; nothing was stored"
            )
        size = 0
        floor = RateFloor(self.min_rate, self.rate_window, what, self.endpoint.host)
        try:
            while True:
                reason = cancelled()
                if reason:
                    raise Cancelled(f"{what}: download stopped after {size} bytes: {reason}")
                try:
                    chunk = response.read1(CHUNK_BYTES)
                except socket.timeout:
                    raise DeadlineExceeded(
                        f"{what}: download stalled, no data from {self.endpoint.host} for {self.timeout:g}s"
                        f" after {size} bytes"
                    ) from None
                except (OSError, http.client.HTTPException) as exc:
                    raise Unavailable(f"{what}: download interrupted after {size} bytes: {exc}") from None
                if not chunk:
                    break
                size += len(chunk)
                if expected_size is not None and size > expected_size:
                    raise FailedPrecondition(
                        f"{what}: size mismatch, the registry sent more than the {expected_size} bytes the manifest "
                        "declares; nothing was stored"
                    )
                hasher.update(chunk)
                destination.write(chunk)
                floor.count(len(chunk))
        finally:
            response.close()
        if expected_size is not None and size != expected_size:
            raise FailedPrecondition(f"{what}: size mismatch, got {size} bytes, the manifest declares {expected_size}; nothing was stored")
        if hasher.hexdigest() != expected_hex:
            raise FailedPrecondition(
                f"{what}: digest mismatch, content is {algorithm}:{hasher.hexdigest()}; "
                "the registry served corrupted or tampered content, nothing was stored"
            )
        return size
