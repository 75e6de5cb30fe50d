"""A whole pyrio stack under supervisord in a private temporary root.

Tests and benchmarks use `Stack`: it writes a pyrio.toml whose every path
(state, run, log, CNI config, IPAM store, cgroup parent, bridge) is private to
this run, starts supervisord with the repository's supervisord.conf the way a
node runs it, and `stop()` removes everything the run made even when a test
failed: processes (by PID, only ours), runc containers, mounts, network
namespaces, veths, the bridge, cgroups and files.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import tomli_w
from cri_api.v1 import api_pb2, api_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SUPERVISORD_CONF = REPO / "supervisord.conf"
SERVICES = ("crigw", "imaged", "netd", "shimd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The cgroup driver stacks run with: "cgroupfs" (default) or "systemd" (the
# node lane sets it; it needs systemd as PID 1).
CGROUP_MANAGER = os.environ.get("PYRIO_TEST_CGROUP_MANAGER", "cgroupfs")


def private_cgroup_parent(tag: str) -> str:
    """A cgroup parent of a test's own: a slice with systemd (stopped at clean-up), else a path."""
    return f"pyrio_test_{tag}.slice" if CGROUP_MANAGER == "systemd" else f"/pyrio-test-{tag}"

# The CNI bridge plugin with isGateway turns on IP forwarding for the whole
# host; tests put the value they found back (pods on one bridge do not need it).
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
_IP_FORWARD_AT_START = IP_FORWARD.read_text() if IP_FORWARD.exists() else None


def restore_ip_forward() -> None:
    if _IP_FORWARD_AT_START is not None and IP_FORWARD.read_text() != _IP_FORWARD_AT_START:
        IP_FORWARD.write_text(_IP_FORWARD_AT_START)


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error on timeout
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_error}" if last_error else ""))


def free_tcp_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Stack:
    def __init__(self, config_overrides: dict[str, Any] | None = None, write_cni: bool = True) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pyrio-", dir="/tmp"))
        # Traversable, as a node's /run is: a user-namespaced pod's root (a
        # host uid like 100000) must reach its mounts staged under the run dir.
        self.root.chmod(0o711)
        suffix = self.root.name.split("-", 1)[1].lower()[:6]
        self.tag = suffix
        self.state_dir = self.root / "state"
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "log"
        self.cni_config_dir = self.root / "cni" / "net.d"
        self.ipam_dir = self.root / "cni" / "ipam"
        self.supervisor_dir = self.run_dir / "supervisor"
        self.socket = self.run_dir / "pyrio.sock"
        self.config_path = self.root / "pyrio.toml"
        self.cgroup_manager = CGROUP_MANAGER
        self.cgroup_parent = private_cgroup_parent(suffix)
        # Interface names are at most 15 bytes.
        self.bridge = f"pyt{suffix}"
        self.subnet_octet = random.randint(100, 250)
        self.subnet = f"10.{self.subnet_octet}.{random.randint(0, 255)}.0/24"
        for directory in (self.state_dir, self.run_dir, self.log_dir, self.cni_config_dir, self.supervisor_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.metrics_port = free_tcp_port()
        self.config: dict[str, Any] = deep_merge(self.base_config(), config_overrides or {})
        self.write_config()
        if write_cni:
            self.write_cni_config()
        self.supervisord: subprocess.Popen | None = None
        self._channel: grpc.Channel | None = None

    # --- configuration -------------------------------------------------

    def base_config(self) -> dict[str, Any]:
        return {
            "pyrio": {
                "state_dir": str(self.state_dir),
                "run_dir": str(self.run_dir),
                "log_level": "debug",
            },
            "runtime": {"cgroup_parent": self.cgroup_parent, "cgroup_manager": self.cgroup_manager},
            "network": {"cni_config_dir": str(self.cni_config_dir)},
            # Never the default 9090: stacks run side by side.
            "metrics": {"port": self.metrics_port},
        }

    def write_config(self) -> None:
        self.config_path.write_text(tomli_w.dumps(self.config))

    def cni_conflist(self, name: str = "pyrio-test") -> dict[str, Any]:
        # No ipMasq and no default route: pods of a test reach only each other.
        return {
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.ipam_dir),
                        "ranges": [[{"subnet": self.subnet}]],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def write_cni_config(self, conflist: dict[str, Any] | None = None, file_name: str = "10-test.conflist") -> Path:
        path = self.cni_config_dir / file_name
        path.write_text(json.dumps(conflist or self.cni_conflist(), indent=1))
        return path

    # --- processes -----------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYRIO_CONFIG=str(self.config_path),
            PYRIO_PYTHON=sys.executable,
            PYRIO_SUPERVISOR_DIR=str(self.supervisor_dir),
        )
        return env

    def start(self, wait: bool = True) -> "Stack":
        supervisord = Path(sys.executable).parent / "supervisord"
        log = open(self.supervisor_dir / "supervisord.stdout", "ab")
        self.supervisord = subprocess.Popen(
            [str(supervisord), "-n", "-c", str(SUPERVISORD_CONF)],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )
        if wait:
            self.wait_ready()
        return self

    def supervisorctl(self, *args: str, check: bool = True) -> str:
        supervisorctl = Path(sys.executable).parent / "supervisorctl"
        result = subprocess.run(
            [str(supervisorctl), "-c", str(SUPERVISORD_CONF), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"supervisorctl {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def service_pid(self, service: str) -> int:
        out = self.supervisorctl("pid", service).strip()
        return int(out)

    def wait_service_running(self, service: str, timeout: float = 30.0) -> int:
        def running() -> int:
            if f"{service}" in self.supervisorctl("status", service, check=False) and "RUNNING" in self.supervisorctl(
                "status", service, check=False
            ):
                return self.service_pid(service)
            return 0

        return wait_until(running, timeout, what=f"{service} RUNNING")

    def wait_ready(self, timeout: float = float(os.environ.get("PYRIO_TEST_READY_TIMEOUT", "40"))) -> None:
        """Until the socket answers and every daemon reports ready."""

        def ready() -> bool:
            if self.supervisord is not None and self.supervisord.poll() is not None:
                raise RuntimeError(f"supervisord exited with {self.supervisord.returncode}: {self.logs('supervisord')}")
            reply = self.runtime.Status(api_pb2.StatusRequest(), timeout=5)
            runtime_ready = [c for c in reply.status.conditions if c.type == "RuntimeReady"]
            return bool(runtime_ready and runtime_ready[0].status)

        wait_until(ready, timeout, interval=0.2, what="pyrio stack ready")

    def logs(self, service: str) -> str:
        path = self.supervisor_dir / f"{service}.log"
        try:
            return path.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    # --- gRPC ------------------------------------------------------------

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        return self._channel

    @property
    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        return api_pb2_grpc.RuntimeServiceStub(self.channel)

    @property
    def images(self) -> api_pb2_grpc.ImageServiceStub:
        return api_pb2_grpc.ImageServiceStub(self.channel)

    # --- teardown --------------------------------------------------------

    def stop(self) -> None:
        """Stop supervisord and remove everything this stack made."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.supervisord is not None and self.supervisord.poll() is None:
            self.supervisord.send_signal(signal.SIGTERM)
            try:
                self.supervisord.wait(30)
            except subprocess.TimeoutExpired:
                self.supervisord.kill()
                self.supervisord.wait(10)
        restore_ip_forward()
        cleanup_root(self.root, self.cgroup_parent, self.bridge, self.subnet)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --- leftovers -------------------------------------------------------------


def parent_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def runtime_containers(root: Path) -> list[str]:
    """Ids of runc/crun containers known under this stack's runtime roots."""
    found = []
    for runtime, binary in (("runc", "/usr/sbin/runc"), ("crun", "/usr/bin/crun")):
        runtime_root = root / "run" / "runtimes" / runtime
        if runtime_root.is_dir() and Path(binary).exists():
            listing = subprocess.run([binary, "--root", str(runtime_root), "list", "-q"], capture_output=True, text=True)
            found.extend(f"{runtime}:{container_id}" for container_id in listing.stdout.split())
    return found


def leak_report(stack: "Stack") -> dict[str, list]:
    """What a stack still holds on the node: all lists are empty when every
    pod and container was removed. Daemons and supervisord are not leaks."""
    daemon_pids = set()
    if stack.supervisord is not None and stack.supervisord.poll() is None:
        daemon_pids.add(stack.supervisord.pid)
        for service in SERVICES:
            try:
                daemon_pids.add(stack.service_pid(service))
            except (RuntimeError, ValueError):
                pass
    # Direct children of a daemon (shimd's zygote) belong to it; shims and
    # containers are reparented away from their daemon, so they still count.
    processes = [
        pid for pid in processes_of_root(stack.root) if pid not in daemon_pids and parent_pid(pid) not in daemon_pids
    ]
    processes += processes_in_cgroups(stack.cgroup_parent)
    links = subprocess.run(["ip", "-o", "link", "show", "master", stack.bridge], capture_output=True, text=True)
    cgroups = [
        str(sub) for directory in cgroup_dirs(stack.cgroup_parent) for sub in directory.rglob("*") if sub.is_dir()
    ]
    return {
        "mounts": mounts_under(stack.root),
        "processes": sorted(set(processes)),
        "runtime_containers": runtime_containers(stack.root),
        "veths": [line.split(": ")[1].split("@")[0] for line in links.stdout.splitlines()],
        "cgroups": cgroups,
        "iptables_chains": portmap_chains(stack.subnet),
    }


def processes_of_root(root: Path) -> list[int]:
    """PIDs of processes this stack started: their command line names its root."""
    marker = str(root).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker in handle.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def cgroup_dirs(cgroup_parent: str) -> list[Path]:
    """The directories of a cgroup parent (a path, or a systemd slice name) in every hierarchy."""
    if cgroup_parent.endswith(".slice"):
        from common.cgroups.systemd import expand_slice

        cgroup_parent = expand_slice(cgroup_parent)
    relative = cgroup_parent.strip("/")
    found = []
    if not relative or not CGROUP_ROOT.exists():
        return found
    for controller in CGROUP_ROOT.iterdir():
        candidate = controller / relative
        if candidate.is_dir():
            found.append(candidate)
    if (CGROUP_ROOT / "cgroup.controllers").exists() and (CGROUP_ROOT / relative).is_dir():
        found.append(CGROUP_ROOT / relative)
    return found


def processes_in_cgroups(cgroup_parent: str) -> list[int]:
    pids: set[int] = set()
    for directory in cgroup_dirs(cgroup_parent):
        for procs in directory.rglob("cgroup.procs"):
            try:
                pids.update(int(line) for line in procs.read_text().split())
            except OSError:
                continue
    return sorted(pids)


def mounts_under(prefix: Path) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == str(prefix) or point.startswith(str(prefix) + "/"):
                points.append(point)
    return points


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def portmap_chains(subnet: str) -> list[str]:
    """Per-pod nat chains (CNI-DN-*) the portmap plugin made for pods of `subnet`.

    The shared CNI-HOSTPORT-* chains are the node's, used by every stack, and
    are left alone; a pod's own chain must be gone after its CNI DEL.
    """
    listing = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True)
    network = subnet.rsplit(".", 1)[0] + "."
    chains = set()
    for line in listing.stdout.splitlines():
        parts = line.split()
        if len(parts) > 1 and parts[0] == "-A" and parts[1].startswith("CNI-DN-") and network in line:
            chains.add(parts[1])
    return sorted(chains)


def remove_portmap_chains(subnet: str) -> None:
    chains = portmap_chains(subnet)
    if not chains:
        return
    listing = subprocess.run(["iptables", "-w", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT"], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["-A", "CNI-HOSTPORT-DNAT"] and parts[-1] in chains:
            # Re-issue the rule as printed, with -D: shlex keeps the quoted comment whole.
            subprocess.run(["iptables", "-w", "-t", "nat", "-D", *shlex.split(line)[1:]], capture_output=True)
    for chain in chains:
        subprocess.run(["iptables", "-w", "-t", "nat", "-F", chain], capture_output=True)
        subprocess.run(["iptables", "-w", "-t", "nat", "-X", chain], capture_output=True)


def remove_cgroups(cgroup_parent: str) -> None:
    """Remove a test's cgroup parent and what is below it: a slice is stopped through systemd
    (its scopes, containers' and shims', are empty by now, so the stop is quick)."""
    if cgroup_parent.endswith(".slice"):
        from common.cgroups import systemd_dbus

        try:
            systemd_dbus.stop_unit(cgroup_parent)
        except Exception as exc:  # the clean-up goes on; leak_report tells what stayed
            print(f"cannot stop {cgroup_parent}: {exc}", file=sys.stderr)
    for directory in cgroup_dirs(cgroup_parent):
        for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                sub.rmdir()
            except OSError:
                pass
        try:
            directory.rmdir()
        except OSError:
            pass


def cleanup_root(root: Path, cgroup_parent: str, bridge: str, subnet: str = "") -> None:
    for _ in range(3):
        pids = processes_of_root(root) + processes_in_cgroups(cgroup_parent)
        if not pids:
            break
        kill_pids(pids)
        time.sleep(0.3)
    for runtime, binary in (("runc", "/usr/sbin/runc"), ("crun", "/usr/bin/crun")):
        runtime_root = root / "run" / "runtimes" / runtime
        if runtime_root.is_dir() and Path(binary).exists():
            listing = subprocess.run([binary, "--root", str(runtime_root), "list", "-q"], capture_output=True, text=True)
            for container_id in listing.stdout.split():
                subprocess.run([binary, "--root", str(runtime_root), "delete", "--force", container_id], capture_output=True)
    # Deepest first, lazily: a busy mount must not stop the rest of the clean-up.
    for point in sorted(mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    links = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True)
    for line in links.stdout.splitlines():
        name = line.split(": ")[1].split("@")[0]
        subprocess.run(["ip", "link", "delete", name], capture_output=True)
    subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
    if subnet:
        remove_portmap_chains(subnet)
    remove_cgroups(cgroup_parent)
    shutil.rmtree(root, ignore_errors=True)
