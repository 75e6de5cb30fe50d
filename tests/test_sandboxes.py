"""Pod sandboxes through the gateway socket: namespaces, pod files, CNI networking.

Every pod's network namespace is looked into from the host with nsenter on
its pinned path; traffic goes only between the test's own pods or to
127.0.0.1 (port mappings), over the stack's private bridge and subnet.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from common.config import load_config
from common.daemon import client_for
from tests.fixtures_containers import Containers
from tests.fixtures_pods import BUSYBOX, Pods, free_port, host_local_allocations, in_netns, pod_config, sandbox_info
from tests.harness import Stack, mounts_under, portmap_chains, wait_until


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def bridge_ports(stack: Stack) -> list[str]:
    links = subprocess.run(["ip", "-o", "link", "show", "master", stack.bridge], capture_output=True, text=True)
    return [line.split(": ")[1].split("@")[0] for line in links.stdout.splitlines()]


def host_veth_of(stack: Stack, netns: str) -> str:
    """The host end (on the bridge) of a pod's eth0, by the peer's ifindex."""
    link = in_netns(netns, "ip", "-o", "link", "show", "eth0").stdout
    peer_index = link.split("@if", 1)[1].split(":", 1)[0]
    host = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in host.splitlines():
        if line.startswith(f"{peer_index}: "):
            return line.split(": ")[1].split("@")[0]
    raise AssertionError(f"no host link with index {peer_index}")


class Listener:
    """A busybox nc one-shot TCP server inside a pod netns, killed by PID at the end."""

    def __init__(self, netns: str, port: int, reply: str = "") -> None:
        command = ["nsenter", f"--net={netns}", BUSYBOX, "nc", "-l", "-p", str(port)]
        if reply:
            command = ["nsenter", f"--net={netns}", BUSYBOX, "sh", "-c", f"echo {reply} | {BUSYBOX} nc -l -p {port}"]
        # stdin is a pipe held open: at EOF on stdin busybox nc ends the
        # connection, and on a busy machine that raced the peer's data.
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        wait_until(
            # busybox nc listens on :: when IPv6 is there, so look at both tables.
            lambda: f":{port:04X} " in in_netns(netns, "cat", "/proc/net/tcp", "/proc/net/tcp6").stdout,
            10,
            what=f"listener on port {port}",
        )

    def output(self) -> str:
        # It ends when the peer closes; stdin stays open until then.
        self.process.wait(timeout=10)
        return self.process.stdout.read() if self.process.stdout else ""

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# --- networking ----------------------------------------------------------------


def test_pod_gets_eth0_with_reported_ip_and_route_via_bridge(stack: Stack, pods: Pods) -> None:
    sandbox_id = pods.run()
    status = pods.status(sandbox_id).status
    assert status.state == api_pb2.SANDBOX_READY
    ip = status.network.ip
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(stack.subnet)
    netns = sandbox_info(stack, sandbox_id)["namespaces"]["network"]
    assert netns.startswith(str(stack.run_dir / "netns"))
    addresses = in_netns(netns, "ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
    assert f"inet {ip}/24" in addresses
    routes = in_netns(netns, "ip", "-4", "route").stdout
    assert f"{stack.subnet} dev eth0" in routes
    # No route out: the test network reaches only its own pods.
    assert "default" not in routes
    assert host_veth_of(stack, netns) in bridge_ports(stack)
    assert "UP" in in_netns(netns, "ip", "-o", "link", "show", "lo").stdout
    # CNI CHECK of the live attachment passes.
    client = client_for(load_config(str(stack.config_path)), "netd")
    try:
        assert client.call("sandbox.check", {"sandbox_id": sandbox_id}) == {}
    finally:
        client.close()


def test_two_pods_reach_each_other(stack: Stack, pods: Pods) -> None:
    first, second = pods.run(), pods.run()
    first_netns = sandbox_info(stack, first)["namespaces"]["network"]
    second_netns = sandbox_info(stack, second)["namespaces"]["network"]
    second_ip = pods.status(second).status.network.ip
    in_netns(first_netns, BUSYBOX, "ping", "-c", "1", "-W", "3", second_ip)
    listener = Listener(second_netns, 7000)
    try:
        in_netns(first_netns, BUSYBOX, "sh", "-c", f"echo hello-from-first | {BUSYBOX} nc -w 3 {second_ip} 7000")
        assert listener.output().strip() == "hello-from-first"
    finally:
        listener.close()


def test_stop_and_remove_release_ip_veth_mounts_and_rules(stack: Stack, pods: Pods) -> None:
    sandbox_id = pods.run(pod_config(port_mappings=[(80, free_port())], pid_mode=api_pb2.POD))
    info = sandbox_info(stack, sandbox_id)
    ip = info["network"]["ip"]
    veth = host_veth_of(stack, info["namespaces"]["network"])
    pins = [path for path in info["namespaces"].values() if path]
    assert len(pins) == 4 and all(path in mounts_under(stack.run_dir) for path in pins)
    assert ip in host_local_allocations(stack)
    assert any(sandbox_id in line for line in subprocess.run(
        ["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True).stdout.splitlines())

    pods.stop(sandbox_id)
    assert pods.status(sandbox_id).status.state == api_pb2.SANDBOX_NOTREADY
    assert ip not in host_local_allocations(stack)
    assert veth not in bridge_ports(stack)
    assert not any(path in mounts_under(stack.root) for path in pins)
    assert not any(os.path.exists(path) for path in pins)
    assert info["files"]["shm"] not in mounts_under(stack.root)
    assert not os.path.exists(f"/proc/{info['pid_holder']}") or "pyrio-pod-pid-holder" not in Path(
        f"/proc/{info['pid_holder']}/cmdline").read_text()
    assert sandbox_id not in subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    pods.stop(sandbox_id)  # idempotent

    pods.remove(sandbox_id)
    assert not Path(info["files"]["resolv_conf"]).parent.exists()
    error = rpc_error(pods.status, sandbox_id)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    pods.remove(sandbox_id)  # removing a removed sandbox succeeds
    pods.stop(sandbox_id)  # and so does stopping it


def test_remove_without_stop_tears_everything_down(stack: Stack, pods: Pods) -> None:
    sandbox_id = pods.run()
    info = sandbox_info(stack, sandbox_id)
    pods.remove(sandbox_id)
    assert info["network"]["ip"] not in host_local_allocations(stack)
    assert not any(sandbox_id in point for point in mounts_under(stack.root))


def test_port_mapping_reachable_on_localhost(stack: Stack, pods: Pods) -> None:
    host_port = free_port()
    sandbox_id = pods.run(pod_config(port_mappings=[(8080, host_port)]))
    netns = sandbox_info(stack, sandbox_id)["namespaces"]["network"]
    listener = Listener(netns, 8080, reply="hello-through-portmap")
    try:
        with socket.create_connection(("127.0.0.1", host_port), timeout=5) as conn:
            conn.settimeout(5)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(100)
                if not chunk:
                    break
                data += chunk
        assert data.decode().strip() == "hello-through-portmap"
    finally:
        listener.close()
    pods.stop(sandbox_id)
    assert portmap_chains(stack.subnet) == []


# --- namespaces and pod files ------------------------------------------------


def test_hostname_in_uts_namespace_and_pod_files(stack: Stack, pods: Pods) -> None:
    sandbox_id = pods.run(pod_config(hostname="web-1"))
    info = sandbox_info(stack, sandbox_id)
    uts = subprocess.run(["nsenter", f"--uts={info['namespaces']['uts']}", "hostname"], capture_output=True, text=True)
    assert uts.stdout.strip() == "web-1"
    assert socket.gethostname() != "web-1"
    assert Path(info["files"]["hostname"]).read_text() == "web-1\n"
    assert f"{info['network']['ip']}\tweb-1" in Path(info["files"]["hosts"]).read_text()
    # The pod's /dev/shm is a tmpfs of the configured size (64 MiB by default).
    shm = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", info["files"]["shm"]], capture_output=True, text=True)
    assert shm.stdout.startswith("tmpfs") and "size=65536k" in shm.stdout


def test_dns_config_written_to_resolv_conf(stack: Stack, pods: Pods) -> None:
    dns = {"servers": ["10.96.0.10", "10.96.0.11"], "searches": ["ns.svc.cluster.local", "svc.cluster.local"],
           "options": ["ndots:5", "edns0"]}
    sandbox_id = pods.run(pod_config(dns=dns))
    resolv = Path(sandbox_info(stack, sandbox_id)["files"]["resolv_conf"]).read_text()
    assert resolv == (
        "nameserver 10.96.0.10\nnameserver 10.96.0.11\n"
        "search ns.svc.cluster.local svc.cluster.local\noptions ndots:5 edns0\n"
    )
    default = pods.run(pod_config())
    host = Path("/etc/resolv.conf").read_text() if Path("/etc/resolv.conf").exists() else ""
    assert Path(sandbox_info(stack, default)["files"]["resolv_conf"]).read_text() == host


def test_host_network_pod(stack: Stack, pods: Pods) -> None:
    before = bridge_ports(stack)
    sandbox_id = pods.run(pod_config(host_network=True, hostname="ignored-for-host-network"))
    status = pods.status(sandbox_id).status
    assert status.state == api_pb2.SANDBOX_READY
    assert status.linux.namespaces.options.network == api_pb2.NODE
    info = sandbox_info(stack, sandbox_id)
    assert info["namespaces"]["network"] == "" and info["namespaces"]["uts"] == ""
    assert info["namespaces"]["ipc"]  # IPC stays the pod's own
    assert bridge_ports(stack) == before
    pods.stop(sandbox_id)
    pods.remove(sandbox_id)


def test_shared_pid_namespace_has_a_live_init(stack: Stack, pods: Pods) -> None:
    sandbox_id = pods.run(pod_config(pid_mode=api_pb2.POD))
    status = pods.status(sandbox_id).status
    assert status.linux.namespaces.options.pid == api_pb2.POD
    pid_ns = sandbox_info(stack, sandbox_id)["namespaces"]["pid"]
    # A process joining the pinned namespace is not its PID 1: the holder is.
    joined = subprocess.run(["nsenter", f"--pid={pid_ns}", BUSYBOX, "sh", "-c", "echo $$"],
                            capture_output=True, text=True, timeout=10)
    assert int(joined.stdout.strip()) > 1


def test_safe_sysctls_applied_in_pod_namespaces(stack: Stack, pods: Pods) -> None:
    sandbox_id = pods.run(pod_config(sysctls={
        "net.ipv4.ip_local_port_range": "20000 30000",
        "kernel/shm_rmid_forced": "1",
    }))
    info = sandbox_info(stack, sandbox_id)
    port_range = in_netns(info["namespaces"]["network"], "cat", "/proc/sys/net/ipv4/ip_local_port_range").stdout
    assert port_range.split() == ["20000", "30000"]
    ipc = subprocess.run(["nsenter", f"--ipc={info['namespaces']['ipc']}", "cat", "/proc/sys/kernel/shm_rmid_forced"],
                         capture_output=True, text=True)
    assert ipc.stdout.strip() == "1"
    assert Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split() != ["20000", "30000"]


def test_namespaced_sysctls_the_kubelet_sends_are_applied(stack: Stack, containers: Containers) -> None:
    """Every namespaced sysctl, not only the safe set (issue 12 item 5), as
    containerd and CRI-O: the values show inside the pod, the node's stay."""
    wanted = {
        "net.core.somaxconn": "1111",
        "net/ipv4/tcp_fin_timeout": "17",
        "kernel.msgmax": "12345",
        "kernel.sem": "251 32001 33 129",
        "kernel.shmmni": "2222",
        "fs.mqueue.msg_max": "23",
    }
    paths = {name: "/proc/sys/" + name.replace(".", "/") for name in wanted}
    host_before = {name: Path(path).read_text() for name, path in paths.items()}
    container_id = containers.run(pod=containers.pod(sysctls=wanted), command=["sleep", "600"])
    for name, path in paths.items():
        seen = containers.exec(container_id, "cat", path).stdout.decode().split()
        assert seen == wanted[name].split(), (name, seen)
    assert {name: Path(path).read_text() for name, path in paths.items()} == host_before


@pytest.mark.parametrize("sysctl, host_network, host_ipc", [
    ("kernel.msgmax", False, True),  # namespaced, but would change the node's IPC namespace
    ("vm.swappiness", False, False),  # node-wide
    ("net.ipv4.no_such_knob", False, False),  # unknown
    ("net.ipv4.ip_local_port_range", True, False),  # safe, but would change the node's network
    ("net.ipv4.conf./../../../kernel.panic", False, False),  # a path out of net.*
])
def test_unsafe_or_unknown_sysctl_refused(
    stack: Stack, pods: Pods, sysctl: str, host_network: bool, host_ipc: bool
) -> None:
    before = len(stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items)
    error = rpc_error(pods.run, pod_config(sysctls={sysctl: "1"}, host_network=host_network, host_ipc=host_ipc))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sysctl in error.details()
    assert len(stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items) == before


def test_sysctl_value_the_kernel_refuses_leaves_nothing(stack: Stack, pods: Pods) -> None:
    before = len(stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items)
    allocations = host_local_allocations(stack)
    error = rpc_error(pods.run, pod_config(sysctls={"net.ipv4.tcp_syncookies": "not-a-number"}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "net.ipv4.tcp_syncookies" in error.details()
    listed = {item.id for item in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items}
    assert len(listed) == before
    assert host_local_allocations(stack) == allocations
    # No pinned namespace outlives the failed run.
    pins = stack.run_dir / "netns"
    assert not pins.exists() or {pin.name for pin in pins.iterdir()} <= listed


# --- records, ids and errors -------------------------------------------------


def test_duplicate_metadata_refused_naming_the_holder(stack: Stack, pods: Pods) -> None:
    config = pod_config()
    first = pods.run(config)
    error = rpc_error(pods.run, config)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first in error.details()
    pods.stop(first)
    assert rpc_error(pods.run, config).code() == grpc.StatusCode.ALREADY_EXISTS  # still reserved while stopped
    # Another attempt is another name.
    retry = pod_config(name=config.metadata.name, uid=config.metadata.uid, attempt=1)
    pods.run(retry)
    pods.remove(first)
    pods.run(config)  # free again once removed


def test_metadata_required(stack: Stack, pods: Pods) -> None:
    config = pod_config()
    config.metadata.uid = ""
    error = rpc_error(pods.run, config)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "uid" in error.details()


def test_unknown_and_ambiguous_ids(stack: Stack, pods: Pods) -> None:
    unknown = "f" * 64
    assert rpc_error(pods.status, unknown).code() == grpc.StatusCode.NOT_FOUND
    pods.stop(unknown)
    pods.remove(unknown)
    assert rpc_error(pods.status, "").code() == grpc.StatusCode.INVALID_ARGUMENT


def test_status_and_list_report_what_was_recorded(stack: Stack, pods: Pods) -> None:
    marker = f"run-{random.randint(0, 1 << 30)}"
    config = pod_config(labels={"app": "web", "marker": marker}, annotations={"note": "yes"},
                        log_directory="/var/log/pods/x", cgroup_parent="/kubepods/pod-x")
    ready = pods.run(config)
    stopped = pods.run(pod_config(labels={"app": "db", "marker": marker}))
    pods.stop(stopped)
    # Ids are accepted by unique prefix.
    status = pods.status(ready[:12], verbose=True)
    assert status.status.id == ready
    assert status.status.metadata == config.metadata
    assert dict(status.status.labels) == dict(config.labels)
    assert dict(status.status.annotations) == {"note": "yes"}
    assert status.status.runtime_handler == ""
    assert status.status.created_at > 0 and status.timestamp >= status.status.created_at
    info = sandbox_info(stack, ready)
    assert info["cgroup_parent"] == "/kubepods/pod-x" and info["log_directory"] == "/var/log/pods/x"

    def listed(filter_: api_pb2.PodSandboxFilter) -> set[str]:
        reply = stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=filter_), timeout=10)
        return {item.id for item in reply.items}

    mine = {"marker": marker}
    assert listed(api_pb2.PodSandboxFilter(label_selector=mine)) == {ready, stopped}
    assert listed(api_pb2.PodSandboxFilter(label_selector={**mine, "app": "db"})) == {stopped}
    ready_state = api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_READY)
    notready_state = api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_NOTREADY)
    assert listed(api_pb2.PodSandboxFilter(state=ready_state, label_selector=mine)) == {ready}
    assert listed(api_pb2.PodSandboxFilter(state=notready_state, label_selector=mine)) == {stopped}
    assert listed(api_pb2.PodSandboxFilter(id=stopped[:10])) == {stopped}
    assert listed(api_pb2.PodSandboxFilter(id="0123456789abcdef" * 4)) == set()
    item = [i for i in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items if i.id == ready][0]
    assert item.state == api_pb2.SANDBOX_READY and item.metadata.name == config.metadata.name


def test_unknown_runtime_handler_refused(stack: Stack, pods: Pods) -> None:
    error = rpc_error(pods.run, pod_config(), runtime_handler="no-such-handler")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-handler" in error.details()


def test_pods_run_concurrently(stack: Stack, pods: Pods) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: pods.run(), range(8)))
    ips = {pods.status(sandbox_id).status.network.ip for sandbox_id in ids}
    assert len(ips) == 8
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(pods.remove, ids))
    assert not ips & set(host_local_allocations(stack))
    assert not any(any(sandbox_id in point for sandbox_id in ids) for point in mounts_under(stack.root))
