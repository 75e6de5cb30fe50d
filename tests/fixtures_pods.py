"""Fixtures for the pods tests (kept apart so each area owns its file).

`pod_config(...)` builds a PodSandboxConfig with unique metadata; the `pods`
fixture runs sandboxes on a stack and stops and removes every one of them at
the end of the test, even when it failed. `in_netns(path, ...)` runs a
command inside a pinned network namespace from the host (containers are
not needed to look into a pod).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.harness import Stack

BUSYBOX = "/bin/busybox"


def pod_config(
    name: str | None = None,
    namespace: str = "pyrio-test",
    uid: str | None = None,
    attempt: int = 0,
    hostname: str = "",
    host_network: bool = False,
    host_ipc: bool = False,
    pid_mode: int = api_pb2.CONTAINER,
    port_mappings: list[tuple[int, int]] | None = None,
    dns: dict[str, list[str]] | None = None,
    sysctls: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    log_directory: str = "",
    cgroup_parent: str = "",
) -> api_pb2.PodSandboxConfig:
    """A PodSandboxConfig with unique metadata unless told otherwise.

    port_mappings: (container_port, host_port) TCP pairs published on 127.0.0.1.
    """
    name = name or f"pod-{uuid.uuid4().hex[:8]}"
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace=namespace, uid=uid or uuid.uuid4().hex, attempt=attempt),
        hostname=hostname,
        labels=labels or {},
        annotations=annotations or {},
        log_directory=log_directory,
    )
    for container_port, host_port in port_mappings or []:
        config.port_mappings.append(
            api_pb2.PortMapping(protocol=api_pb2.TCP, container_port=container_port, host_port=host_port, host_ip="127.0.0.1")
        )
    if dns is not None:
        config.dns_config.CopyFrom(
            api_pb2.DNSConfig(servers=dns.get("servers", []), searches=dns.get("searches", []), options=dns.get("options", []))
        )
    options = config.linux.security_context.namespace_options
    options.network = api_pb2.NODE if host_network else api_pb2.POD
    options.ipc = api_pb2.NODE if host_ipc else api_pb2.POD
    options.pid = pid_mode
    config.linux.sysctls.update(sysctls or {})
    if cgroup_parent:
        config.linux.cgroup_parent = cgroup_parent
    return config


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now, for a pod's host port:
    portmap redirects local traffic to it while the pod runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_netns(netns: str, *command: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in a pod's pinned network namespace (like `ip netns exec`)."""
    result = subprocess.run(["nsenter", f"--net={netns}", *command], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} in {netns} failed: {result.stdout}{result.stderr}")
    return result


def sandbox_info(stack: Stack, sandbox_id: str) -> dict[str, Any]:
    """netd's record of a sandbox, from PodSandboxStatus's verbose info."""
    reply = stack.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=10
    )
    return json.loads(reply.info["info"])


def host_local_allocations(stack: Stack) -> list[str]:
    """IPs the host-local IPAM store of the stack's network still holds."""
    allocated = []
    for network_dir in Path(stack.ipam_dir).glob("*"):
        if network_dir.is_dir():
            allocated += [p.name for p in network_dir.iterdir() if p.name[0].isdigit() and "last_reserved" not in p.name]
    return sorted(allocated)


class Pods:
    """Runs sandboxes on a stack and removes every one at the end."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ids: list[str] = []

    def run(self, config: api_pb2.PodSandboxConfig | None = None, runtime_handler: str = "") -> str:
        reply = self.stack.runtime.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=config or pod_config(), runtime_handler=runtime_handler), timeout=120
        )
        self.ids.append(reply.pod_sandbox_id)
        return reply.pod_sandbox_id

    def stop(self, sandbox_id: str) -> None:
        self.stack.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)

    def remove(self, sandbox_id: str) -> None:
        self.stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=120)

    def status(self, sandbox_id: str, verbose: bool = False) -> api_pb2.PodSandboxStatusResponse:
        return self.stack.runtime.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose), timeout=10
        )

    def cleanup(self) -> None:
        for sandbox_id in reversed(self.ids):
            try:
                self.stop(sandbox_id)
                self.remove(sandbox_id)
            except grpc.RpcError:
                pass  # the stack's own teardown removes whatever is left


@pytest.fixture
def pods(stack: Stack) -> Iterator[Pods]:
    own = Pods(stack)
    try:
        yield own
    finally:
        own.cleanup()


# A CNI plugin for fault tests, chained after the bridge: by the word in its
# `mode` file it passes ADD through ("ok"), fails it with a spec error object
# ("fail") or hangs in it ("hang"), or hangs in DEL ("hang-del"); it notes
# each ADD in `add-started` and each DEL in `del-started`, and
# keeps the stdin and CNI_* environment of its last ADD and DEL in
# `add.json` / `del.json`.
FAULT_PLUGIN = '''#!{python}
import json, os, sys, time, pathlib
here = pathlib.Path(__file__).parent
command = os.environ.get("CNI_COMMAND")
conf = json.load(sys.stdin) if command != "VERSION" else {{}}
mode = (here / "mode").read_text().strip() if (here / "mode").exists() else "ok"
if command in ("ADD", "DEL"):
    seen = {{"stdin": conf, "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}}}
    (here / (command.lower() + ".json")).write_text(json.dumps(seen))
if command == "VERSION":
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}}))
elif command == "ADD":
    (here / "add-started").write_text(os.environ.get("CNI_CONTAINERID", ""))
    if mode == "fail":
        print(json.dumps({{"cniVersion": "1.0.0", "code": 11, "msg": "pyrio-test-fault: injected failure",
                          "details": "the fault plugin was told to fail"}}))
        sys.exit(1)
    if mode == "hang":
        time.sleep(300)
    print(json.dumps(conf.get("prevResult") or {{}}))
elif command == "DEL":
    (here / "del-started").write_text(os.environ.get("CNI_CONTAINERID", ""))
    if mode == "hang-del":
        time.sleep(300)
'''

FAULT_PLUGIN_MESSAGE = "pyrio-test-fault: injected failure: the fault plugin was told to fail"


class FaultStack(Stack):
    """A private stack whose network chains the fault plugin after the bridge."""

    def __init__(self) -> None:
        super().__init__()
        self.plugin_dir = self.root / "cni" / "bin"
        self.plugin_dir.mkdir(parents=True)
        plugin = self.plugin_dir / "pyrio-test-fault"
        plugin.write_text(FAULT_PLUGIN.format(python=sys.executable))
        plugin.chmod(0o755)
        self.config["network"]["cni_plugin_dirs"] = ["/usr/lib/cni", str(self.plugin_dir)]
        self.write_config()
        conflist = self.cni_conflist()
        conflist["plugins"].insert(1, {"type": "pyrio-test-fault", "capabilities": {"portMappings": True, "dns": True}})
        self.write_cni_config(conflist)

    def set_fault(self, mode: str) -> None:
        (self.plugin_dir / "mode").write_text(mode)

    def plugin_saw(self, command: str) -> dict[str, Any]:
        """The stdin and CNI_* environment of the fault plugin's last ADD or DEL."""
        return json.loads((self.plugin_dir / f"{command.lower()}.json").read_text())

    def add_started(self) -> str:
        return self._marker("add-started")

    def del_started(self) -> str:
        return self._marker("del-started")

    def _marker(self, name: str) -> str:
        path = self.plugin_dir / name
        return path.read_text() if path.exists() else ""


@pytest.fixture
def fault_stack() -> Iterator[FaultStack]:
    own = FaultStack()
    try:
        own.start()
        yield own
    finally:
        own.stop()
