"""The two runtimes `bench compare` drives: Debian's containerd and pyrio.

Both are started privately by the bench, on sockets, roots, CNI config dirs,
bridges and subnets of their own, and are reached the same way: a CRI gRPC
channel to a unix socket. containerd is never run as the system service: it
gets its own config file (restrict_oom_score_adj, since the machine has no
CAP_SYS_RESOURCE), is stopped by its PID, and everything it made is removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from bench.proc_stats import children_of, descendants
from tests.harness import Stack, cleanup_root, processes_of_root, restore_ip_forward, wait_until

CONTAINERD = "/usr/bin/containerd"
CNI_BIN_DIR = "/usr/lib/cni"
# containerd 1.6 puts its shims' sockets here whatever its config says.
CONTAINERD_SHIM_SOCKETS = Path("/run/containerd/s")


def ensure_containerd() -> None:
    """Install Debian's containerd package when it is missing (never enabling it)."""
    if Path(CONTAINERD).exists():
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", RUNLEVEL="1")
    subprocess.run(["apt-get", "install", "-y", "-qq", "containerd"], check=True, env=env)


class CriRuntime:
    """What the workload needs of a runtime: stubs, cgroup parent, process sets."""

    name = ""

    def __init__(self, root: Path) -> None:
        self.root = root
        suffix = self.root.name.rsplit("-", 1)[1].lower()[:6]
        self.cgroup_parent = f"/pyrio-cmp-{self.name[:4]}-{suffix}"
        self.bridge = f"pcmp{self.name[:2]}{suffix[:4]}"
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
        self._channel: grpc.Channel | None = None

    @property
    def socket(self) -> str:
        raise NotImplementedError

    def connect(self) -> None:
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)
        self.images = api_pb2_grpc.ImageServiceStub(self._channel)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            reply = self.runtime.Status(api_pb2.StatusRequest(), timeout=5)
            return all(condition.status for condition in reply.status.conditions)

        wait_until(ready, timeout, interval=0.2, what=f"{self.name} ready")

    def daemon_pids(self) -> set[int]:
        raise NotImplementedError

    def all_pids(self) -> set[int]:
        """Daemons, shims, pod processes and containers of this runtime."""
        raise NotImplementedError

    def puller_pid(self) -> int:
        """The process that downloads and unpacks images."""
        raise NotImplementedError

    def service_pids(self) -> dict[str, int]:
        """The daemons by name, for per-process figures."""
        return {self.name: pid for pid in self.daemon_pids()}


def containerd_config(root: Path, registry_host: str, pause_image: str) -> str:
    return f"""version = 2
root = "{root}/root"
state = "{root}/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[debug]
  address = "{root}/debug.sock"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{root}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry_host}"]
    endpoint = ["http://{registry_host}"]
"""


class Containerd(CriRuntime):
    name = "containerd"

    def __init__(self, registry_host: str, pause_image: str) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="pyrio-cmp-containerd-", dir="/tmp")))
        self.registry_host = registry_host
        self.pause_image = pause_image
        self.process: subprocess.Popen | None = None
        self.shim_sockets_existed = CONTAINERD_SHIM_SOCKETS.exists()

    @property
    def socket(self) -> str:
        return str(self.root / "containerd.sock")

    def start(self) -> "Containerd":
        ensure_containerd()
        (self.root / "cni" / "net.d").mkdir(parents=True)
        # The harness's network (no ipMasq, no default route) on this runtime's bridge and subnet.
        self.ipam_dir = self.root / "cni" / "ipam"
        conflist = Stack.cni_conflist(self, "pyrio-cmp-containerd")  # type: ignore[arg-type]
        (self.root / "cni" / "net.d" / "10-bench.conflist").write_text(json.dumps(conflist, indent=1))
        config = self.root / "config.toml"
        config.write_text(containerd_config(self.root, self.registry_host, self.pause_image))
        log = open(self.root / "containerd.log", "ab")
        self.process = subprocess.Popen(
            [CONTAINERD, "--config", str(config), "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(lambda: Path(self.socket).exists() or self.process.poll() is not None, 30, what="containerd socket")
        if self.process.poll() is not None:
            raise RuntimeError(f"containerd exited: {(self.root / 'containerd.log').read_text()[-3000:]}")
        self.connect()
        self.wait_ready()
        return self

    def daemon_pids(self) -> set[int]:
        return {self.process.pid} if self.process is not None else set()

    def shim_pids(self) -> list[int]:
        # The shims are reparented away from containerd; their command line names its socket.
        return [pid for pid in processes_of_root(self.root) if self.process is None or pid != self.process.pid]

    def all_pids(self) -> set[int]:
        return descendants([*self.daemon_pids(), *self.shim_pids()])

    def puller_pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def stop(self) -> None:
        """Stop containerd by its PID, then remove every shim, container, mount,
        link, cgroup and file it made."""
        self.close_channel()
        shims = self.shim_pids()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for pid in descendants(shims):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
        runc_root = self.root / "state" / "io.containerd.runtime.v2.task"
        for namespace_dir in runc_root.glob("*"):
            for bundle in namespace_dir.glob("*"):
                subprocess.run(["umount", "-l", str(bundle / "rootfs")], capture_output=True)
        for runc_state in Path("/run/containerd/runc").glob("*") if Path("/run/containerd/runc").exists() else []:
            for container in runc_state.glob("*"):
                if (runc_root / runc_state.name / container.name).exists():
                    subprocess.run(["runc", "--root", str(runc_state), "delete", "--force", container.name], capture_output=True)
        restore_ip_forward()
        cleanup_root(self.root, self.cgroup_parent, self.bridge, self.subnet)
        # containerd 1.6 keeps shim sockets and runc state under /run/containerd: remove what it left.
        if not self.shim_sockets_existed:
            shutil.rmtree("/run/containerd", ignore_errors=True)


class Pyrio(CriRuntime):
    name = "pyrio"

    def __init__(self, stack: Stack | None = None) -> None:
        """A new private Stack, or one already started (then call connect(), not start())."""
        self.stack = stack or Stack()
        super().__init__(self.stack.root)
        self.cgroup_parent = self.stack.cgroup_parent

    @property
    def socket(self) -> str:
        return str(self.stack.socket)

    def start(self) -> "Pyrio":
        self.stack.start()
        self.connect()
        return self

    def daemon_pids(self) -> set[int]:
        """supervisord, the four services, and shimd's shim zygote."""
        if self.stack.supervisord is None:
            return set()
        services = children_of(self.stack.supervisord.pid)
        zygotes = [child for pid in services for child in children_of(pid) if self._is_zygote(child)]
        return {self.stack.supervisord.pid, *services, *zygotes}

    @staticmethod
    def _is_zygote(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                # Shims are forked from it without an exec: they are its children, not shimd's.
                return b"services.shimd import zygote" in handle.read()
        except OSError:
            return False

    def service_pids(self) -> dict[str, int]:
        named = {"supervisord": self.stack.supervisord.pid}
        for service in ("crigw", "imaged", "netd", "shimd"):
            named[service] = self.stack.service_pid(service)
        zygotes = [pid for pid in children_of(named["shimd"]) if self._is_zygote(pid)]
        if zygotes:
            named["shim zygote"] = zygotes[0]
        return named

    def all_pids(self) -> set[int]:
        if self.stack.supervisord is None:
            return set()
        return descendants([self.stack.supervisord.pid, *processes_of_root(self.stack.root)])

    def puller_pid(self) -> int:
        return self.stack.service_pid("imaged")

    def stop(self) -> None:
        self.close_channel()
        self.stack.stop()
