"""Unit tests of netd's pure parts: sysctl policy, resolv.conf, CNI results
and runtime config, list filters, and the shipped default network."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import Config
from common.errors import InvalidArgument
from services.netd import pod_files, sysctls
from services.netd.cni import pod_ips, runtime_config
from services.netd.cni_config import load_network
from services.netd.sandboxes import matches_filter, name_key


def test_sysctl_policy() -> None:
    assert sysctls.validate({"net/ipv4/tcp_syncookies": "1"}, {"net"}) == {"net.ipv4.tcp_syncookies": "1"}
    # Every namespaced sysctl is applied unless the operator restricts them.
    wanted = {"kernel.sem": "250 32000 32 128", "kernel.msgmax": "9", "fs.mqueue.msg_max": "20", "net.core.somaxconn": "512"}
    assert sysctls.validate(wanted, {"net", "ipc"}) == wanted
    assert sysctls.validate(wanted, {"net", "ipc"}, ["*"]) == wanted
    with pytest.raises(InvalidArgument, match="hostIPC"):
        sysctls.validate({"kernel.shm_rmid_forced": "1"}, {"net"})
    with pytest.raises(InvalidArgument, match="hostNetwork"):
        sysctls.validate({"net.core.somaxconn": "512"}, {"ipc"})
    for node_wide in ("vm.swappiness", "kernel.panic", "fs.file-max", "kernel.hostname"):
        with pytest.raises(InvalidArgument, match="not namespaced"):
            sysctls.validate({node_wide: "1"}, {"net", "ipc"})
    # The operator's optional restriction: the safe set and what it lists.
    allowed = ["kernel.msg*", "net.core.somaxconn", "vm.*"]
    assert sysctls.validate({"kernel.msgmax": "9", "net.ipv4.tcp_syncookies": "1"}, {"net", "ipc"}, allowed)
    with pytest.raises(InvalidArgument, match="not allowed on this node"):
        sysctls.validate({"kernel.sem": "1"}, {"net", "ipc"}, allowed)
    with pytest.raises(InvalidArgument, match="not namespaced"):
        sysctls.validate({"vm.swappiness": "1"}, {"net", "ipc"}, allowed)
    with pytest.raises(InvalidArgument, match="invalid value"):
        sysctls.validate({"net.ipv4.tcp_syncookies": "1\n0"}, {"net"})


def test_sysctl_names_and_paths() -> None:
    # The kubelet's dotted form: "/" is a dot inside a component (a VLAN interface).
    assert sysctls.proc_path("net.ipv4.conf.eno2/100.rp_filter") == "/proc/sys/net/ipv4/conf/eno2.100/rp_filter"
    assert sysctls.normalize("net/ipv4/conf/eno2.100/rp_filter") == "net.ipv4.conf.eno2/100.rp_filter"
    assert sysctls.normalize("net.ipv4.ip_forward") == "net.ipv4.ip_forward"
    for escape in ("net./../../kernel.x", "net.ipv4..x", "net.ipv4./..", "net.ipv4.x\n", "net.\0", "net.a b"):
        with pytest.raises(InvalidArgument, match="malformed"):
            sysctls.validate({escape: "1"}, {"net", "ipc"})


def test_resolv_conf() -> None:
    text = pod_files.resolv_conf_text({"servers": ["1.1.1.1"], "options": ["ndots:5"]})
    assert text == "nameserver 1.1.1.1\noptions ndots:5\n"
    with pytest.raises(InvalidArgument):
        pod_files.resolv_conf_text({"servers": ["1.1.1.1 evil"]})


def test_pod_ips_skip_host_side_addresses() -> None:
    result = {
        "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [
            {"address": "fd00::5/64", "interface": 2},
            {"address": "10.1.0.1/24", "interface": 0},
            {"address": "10.1.0.5/24", "interface": 2, "gateway": "10.1.0.1"},
        ],
    }
    assert pod_ips(result) == ["10.1.0.5", "fd00::5"]
    assert pod_ips({"ip4": {"ip": "10.2.0.3/16"}}) == ["10.2.0.3"]
    assert pod_ips(None) == []


def test_runtime_config_publishes_only_host_ports() -> None:
    config = runtime_config(
        [{"container_port": 80}, {"container_port": 53, "host_port": 5353, "protocol": 1}], None
    )
    assert config["portMappings"] == [{"hostPort": 5353, "containerPort": 53, "protocol": "udp"}]
    assert config["dns"] == {"servers": [], "searches": [], "options": []}


def test_list_filter() -> None:
    record = {"id": "abcdef", "state": "ready", "labels": {"app": "web", "tier": "front"}}
    assert matches_filter(record, {})
    assert matches_filter(record, {"id": "abc", "state": "ready", "label_selector": {"app": "web"}})
    assert not matches_filter(record, {"id": "abd"})
    assert not matches_filter(record, {"state": "notready"})
    assert not matches_filter(record, {"label_selector": {"app": "db"}})
    assert name_key({"name": "n", "namespace": "ns", "uid": "u", "attempt": 2}) == "k8s_n_ns_u_2"


def test_default_network_is_valid(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parent.parent / "services" / "netd" / "default.conflist"
    (tmp_path / "10-pyrio.conflist").write_text(shipped.read_text())
    config = Config()
    config.network.cni_config_dir = str(tmp_path)
    network = load_network(config)
    assert network.name == "pyrio"
    assert [plugin["type"] for plugin in network.plugins] == ["bridge", "portmap", "loopback"]
    assert network.plugins[0]["bridge"] == "pyrio0"
    assert network.plugins[0]["ipam"]["ranges"] == [[{"subnet": "10.88.0.0/16"}]]
