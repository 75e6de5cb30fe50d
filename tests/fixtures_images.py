"""Fixtures for the images tests (kept apart so each area owns its file).

`registry`: Debian's docker-registry on 127.0.0.1 (free port, its own
storage dir and config), anonymous, for the session. `auth_registries`: the
same storage served twice more, once behind Basic auth (htpasswd -B) and once
behind bearer tokens from a tiny token server written here, so images pushed
through `registry` are pulled through either door. `tls_registry`: the same storage over
HTTPS with a test CA. `busybox_image`: the
standard test image (tests/oci_images.push_busybox) pushed once per session;
`pulled_busybox`: the same, already pulled into the shared `stack`.

Every registry and token server process is ended by its PID at the end.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from cri_api.v1 import api_pb2

from tests.harness import Stack
from tests.oci_images import PushedImage, basic_auth_header, push_busybox, wait_for_registry

REGISTRY_BINARY = "/usr/bin/docker-registry"
TOKEN_SERVICE = "pyrio-test-registry"
TOKEN_ISSUER = "pyrio-test-token-issuer"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Registry:
    """A running docker-registry on 127.0.0.1."""

    host: str
    storage: Path
    process: subprocess.Popen
    username: str = ""
    password: str = ""
    kind: str = "anonymous"
    extra: dict = field(default_factory=dict)

    def auth_header(self) -> str | None:
        # Pushes go through the anonymous door; auth registries share its storage.
        return None

    def blob_data_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to tamper with it)."""
        algorithm, hexdigest = digest.split(":", 1)
        return self.storage / "docker/registry/v2/blobs" / algorithm / hexdigest[:2] / hexdigest / "data"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _registry_yaml(storage: Path, port: int, auth: str = "") -> str:
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        + auth
    )


def start_registry(workdir: Path, storage: Path, name: str, auth: str = "", tls: tuple[Path, Path] | None = None) -> Registry:
    """Start docker-registry; `tls` is (certificate, key) to serve HTTPS.

    The free port is probed then released, so another test run may take it
    first: a registry that fails to start is retried on a new port."""
    log_path = workdir / f"{name}.log"
    for _attempt in range(3):
        port = free_port()
        config = workdir / f"{name}.yml"
        text = _registry_yaml(storage, port, auth)
        if tls is not None:
            text = text.replace(f"  addr: 127.0.0.1:{port}\n", f"  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n")
        config.write_text(text)
        with open(log_path, "ab") as log:
            process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        registry = Registry(host=f"127.0.0.1:{port}", storage=storage, process=process, kind=name)
        try:
            wait_for_registry(registry.host, timeout=10, tls=tls is not None)
            if process.poll() is None:
                return registry
        except TimeoutError:
            pass
        registry.stop()
    raise RuntimeError(f"docker-registry {name} did not start: {log_path.read_text()[-2000:]}")


# --- bearer tokens ------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Signs registry JWTs (RS256, certificate in x5c) with openssl."""

    def __init__(self, workdir: Path) -> None:
        self.key = workdir / "token.key"
        self.cert = workdir / "token.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key), "-out", str(self.cert),
             "-days", "2", "-subj", "/CN=pyrio-test-token"],
            check=True, capture_output=True,
        )
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True).stdout
        self.cert_der_b64 = base64.b64encode(der).decode()

    def token(self, subject: str, access: list[dict]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.cert_der_b64]}
        claims = {
            "iss": TOKEN_ISSUER, "sub": subject, "aud": TOKEN_SERVICE, "exp": now + 600, "nbf": now - 60,
            "iat": now, "jti": secrets.token_hex(8), "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(), check=True, capture_output=True
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"


class TokenServer:
    """The registry's token endpoint: GET /token with Basic credentials, and
    POST /token with a refresh token (the CRI identity_token)."""

    def __init__(self, issuer: TokenIssuer, username: str, password: str) -> None:
        self.issuer = issuer
        self.username = username
        self.password = password
        self.refresh_token = "refresh-" + secrets.token_hex(8)
        self.requests: list[dict] = []
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _grant(self, params: dict[str, str], authorized: bool) -> None:
                server_self.requests.append({"params": params, "authorized": authorized})
                if not authorized:
                    self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    return
                access = []
                for scope in params.get("scope", "").split():
                    kind, _, rest = scope.partition(":")
                    name, _, actions = rest.rpartition(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                token = server_self.issuer.token(server_self.username, access)
                self._answer(200, {"token": token, "access_token": token, "expires_in": 600,
                                   "refresh_token": server_self.refresh_token})

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                expected = basic_auth_header(server_self.username, server_self.password)
                self._grant(params, self.headers.get("Authorization") == expected)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                params = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                authorized = (
                    params.get("grant_type") == "refresh_token" and params.get("refresh_token") == server_self.refresh_token
                ) or (
                    params.get("grant_type") == "password"
                    and params.get("username") == server_self.username
                    and params.get("password") == server_self.password
                )
                self._grant(params, authorized)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_test_ca(workdir: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for IP 127.0.0.1, server key)."""
    ca_key, ca_cert = workdir / "ca.key", workdir / "ca.crt"
    key, csr, cert, ext = workdir / "server.key", workdir / "server.csr", workdir / "server.crt", workdir / "server.ext"
    run = lambda *args: subprocess.run(list(args), check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert),
        "-days", "2", "-subj", "/CN=pyrio-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca_cert, cert, key


@dataclass
class TlsRegistry:
    registry: Registry
    ca_file: Path

    @property
    def host(self) -> str:
        return self.registry.host


@dataclass
class AuthRegistries:
    basic: Registry
    token: Registry
    token_server: TokenServer
    username: str
    password: str


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry_workdir() -> Iterator[Path]:
    workdir = Path(tempfile.mkdtemp(prefix="pyrio-registry-", dir="/tmp"))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def registry(registry_workdir: Path) -> Iterator[Registry]:
    """An anonymous docker-registry on 127.0.0.1 for the session."""
    storage = registry_workdir / "storage"
    storage.mkdir()
    running = start_registry(registry_workdir, storage, "anonymous")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def auth_registries(registry: Registry, registry_workdir: Path) -> Iterator[AuthRegistries]:
    """The `registry` storage behind Basic auth and behind bearer tokens."""
    username, password = "pyrio", "s3cret-" + secrets.token_hex(4)
    htpasswd = registry_workdir / "htpasswd"
    subprocess.run(["htpasswd", "-B", "-b", "-c", str(htpasswd), username, password], check=True, capture_output=True)
    started: list = []
    try:
        basic = start_registry(
            registry_workdir, registry.storage, "basic",
            f"auth:\n  htpasswd:\n    realm: pyrio-test\n    path: {htpasswd}\n",
        )
        started.append(basic)
        issuer = TokenIssuer(registry_workdir)
        token_server = TokenServer(issuer, username, password)
        started.append(token_server)
        token = start_registry(
            registry_workdir, registry.storage, "token",
            f"auth:\n  token:\n    realm: {token_server.realm}\n    service: {TOKEN_SERVICE}\n"
            f"    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {issuer.cert}\n",
        )
        started.append(token)
        for door in (basic, token):
            door.username, door.password = username, password
        yield AuthRegistries(basic=basic, token=token, token_server=token_server, username=username, password=password)
    finally:
        for item in reversed(started):
            item.stop()


@pytest.fixture(scope="session")
def tls_registry(registry: Registry, registry_workdir: Path) -> Iterator[TlsRegistry]:
    """The `registry` storage served over HTTPS with a test CA (`ca_file`)."""
    ca_file, cert, key = make_test_ca(registry_workdir)
    running = start_registry(registry_workdir, registry.storage, "tls", tls=(cert, key))
    try:
        yield TlsRegistry(running, ca_file)
    finally:
        running.stop()


@pytest.fixture(scope="session")
def busybox_image(registry: Registry) -> PushedImage:
    """The standard busybox test image, pushed once: `busybox_image.reference`."""
    return push_busybox(registry, "pyrio/busybox", "latest")


@pytest.fixture(scope="session")
def pulled_busybox(stack: Stack, busybox_image: PushedImage) -> PushedImage:
    """`busybox_image`, pulled into the shared stack (CreateContainer can use
    `.reference` or `.image_id` at once). Do not remove it in a test."""
    stack.images.PullImage(
        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=busybox_image.reference)), timeout=120
    )
    return busybox_image
