"""Fixtures for the streaming tests (kept apart so each area owns its file).

`streaming_target` is a real busybox runc container of our own in a network
namespace of our own (pinned on a file in a private temp dir, lo up, no
other interface): the streaming server's exec and port-forward backends are
driven against it without the rest of the stack. `local_streaming` is a
StreamingServer on 127.0.0.1 with a backend that targets that container.
Everything is removed at the end, even when a test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from common.config import StreamingSection
from common.errors import Unimplemented
from services.crigw.streaming.exec import ExecSession
from services.crigw.streaming.netns import dial_in_netns
from services.crigw.streaming.portforward import Dialer
from services.crigw.streaming.remotecommand import RemoteStreams, status_exit_code, status_success
from services.crigw.streaming.server import StreamingServer
from tests.harness import remove_cgroups

RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "echo", "cat", "stty", "sleep", "nc", "httpd", "ps", "seq", "head", "wc", "kill", "true", "tr", "dd")


@dataclass
class StreamingTarget:
    root: Path
    runtime_root: Path
    container_id: str
    netns: Path
    cgroup: str

    def exec_info(self) -> dict[str, Any]:
        return {"runtime_path": RUNC, "runtime_root": str(self.runtime_root), "runtime_id": self.container_id, "running": True}

    def run_in(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command in the container (as a test helper, not through the server)."""
        return subprocess.run(
            [RUNC, "--root", str(self.runtime_root), "exec", self.container_id, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=check,
        )

    def start_detached(self, *args: str) -> None:
        subprocess.run(
            [RUNC, "--root", str(self.runtime_root), "exec", "-d", self.container_id, *args],
            check=True,
            timeout=30,
        )

    def processes(self) -> list[str]:
        """Command lines of every process in the container."""
        listing = subprocess.run(
            [RUNC, "--root", str(self.runtime_root), "ps", self.container_id, "-o", "pid,args"],
            capture_output=True,
            text=True,
            check=True,
        )
        return listing.stdout.splitlines()[1:]


def make_busybox_rootfs(rootfs: Path) -> None:
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", rootfs / "bin" / applet)
    for directory in ("proc", "sys", "dev", "tmp", "etc", "www"):
        (rootfs / directory).mkdir(exist_ok=True)
    (rootfs / "www" / "index.html").write_text("hello from the pod\n")


def bundle_config(rootfs: Path, netns: Path, cgroup: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp())
    try:
        subprocess.run([RUNC, "spec"], cwd=work, check=True)
        spec = json.loads((work / "config.json").read_text())
    finally:
        shutil.rmtree(work)
    spec["root"] = {"path": str(rootfs), "readonly": False}
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sleep", "3600"]
    spec["process"]["env"] = ["PATH=/bin", "TERM=xterm"]
    spec["hostname"] = "streamtest"
    spec["linux"]["cgroupsPath"] = cgroup
    for namespace in spec["linux"]["namespaces"]:
        if namespace["type"] == "network":
            namespace["path"] = str(netns)
    return spec


@contextlib.contextmanager
def own_streaming_target() -> Iterator[StreamingTarget]:
    """A running busybox container in a netns of its own; everything removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="pyrio-stream-", dir="/tmp"))
    tag = uuid.uuid4().hex[:8]
    target = StreamingTarget(
        root=root,
        runtime_root=root / "runc",
        container_id=f"stream-{tag}",
        netns=root / "netns",
        cgroup=f"/pyrio-streamtest-{tag}",
    )
    bundle = root / "bundle"
    try:
        make_busybox_rootfs(bundle / "rootfs")
        target.netns.touch()
        subprocess.run(["unshare", f"--net={target.netns}", "true"], check=True)
        subprocess.run(["nsenter", f"--net={target.netns}", "ip", "link", "set", "lo", "up"], check=True)
        (bundle / "config.json").write_text(json.dumps(bundle_config(bundle / "rootfs", target.netns, target.cgroup)))
        subprocess.run(
            [RUNC, "--root", str(target.runtime_root), "run", "-d", "--bundle", str(bundle), target.container_id],
            check=True,
            timeout=60,
            # Not a pipe: the container inherits these and would hold it open.
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        yield target
    finally:
        subprocess.run([RUNC, "--root", str(target.runtime_root), "delete", "--force", target.container_id], capture_output=True)
        subprocess.run(["umount", "-l", str(target.netns)], capture_output=True)
        # runc 1.1.5 on this hybrid host leaves the empty cgroup directories behind.
        remove_cgroups(target.cgroup)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def streaming_target() -> Iterator[StreamingTarget]:
    with own_streaming_target() as target:
        yield target


class LocalBackend:
    """The streaming backend against streaming_target: exec through runc, port-forward into its netns."""

    def __init__(self, target: StreamingTarget) -> None:
        self.target = target
        self.exec_sessions: list[ExecSession] = []

    def exec(self, request: dict[str, Any], streams: RemoteStreams, cancelled: threading.Event) -> dict[str, Any]:
        session = ExecSession(self.target.exec_info(), list(request["cmd"]), self.target.root / "pids")
        self.exec_sessions.append(session)
        code = session.run(streams, cancelled)
        return status_success() if code == 0 else status_exit_code(code)

    def attach(self, request: dict[str, Any], streams: RemoteStreams, cancelled: threading.Event) -> dict[str, Any]:
        raise Unimplemented("attach needs a shim; see the gateway tests")

    def port_dialer(self, request: dict[str, Any]) -> Dialer:
        netns = str(self.target.netns)
        return lambda port: dial_in_netns(netns, port)


@dataclass
class LocalStreaming:
    server: StreamingServer
    backend: LocalBackend
    target: StreamingTarget

    def exec_url(self, cmd: list[str], stdin: bool = False, tty: bool = False, stdout: bool = True, stderr: bool | None = None) -> str:
        return self.server.url_for(
            "exec",
            {
                "container_id": self.target.container_id,
                "cmd": cmd,
                "tty": tty,
                "stdin": stdin,
                "stdout": stdout,
                "stderr": (not tty) if stderr is None else stderr,
            },
        )

    def port_forward_url(self, ports: list[int]) -> str:
        return self.server.url_for("portforward", {"pod_sandbox_id": "local", "port": ports})


def start_local_streaming(target: StreamingTarget, **settings: Any) -> LocalStreaming:
    backend = LocalBackend(target)
    server = StreamingServer(StreamingSection(**settings), backend).start()
    return LocalStreaming(server=server, backend=backend, target=target)


@pytest.fixture(scope="session")
def local_streaming(streaming_target: StreamingTarget) -> Iterator[LocalStreaming]:
    streaming = start_local_streaming(streaming_target)
    try:
        yield streaming
    finally:
        streaming.server.stop()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(cert, key) of a throwaway self-signed certificate for 127.0.0.1, made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key
