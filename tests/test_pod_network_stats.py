"""PodSandboxStats / ListPodSandboxStats carry the pod's network, read by netd
from the pod's pinned network namespace: real traffic between two pods that
have no container at all (so no container process could have told)."""

from __future__ import annotations

from pathlib import Path

from cri_api.v1 import api_pb2

from tests.fixtures_pods import BUSYBOX, Pods, in_netns, sandbox_info

PINGS, PAYLOAD = 20, 1200


def test_traffic_between_two_pods_shows_in_their_network_stats(pods: Pods) -> None:
    sender, receiver = pods.run(), pods.run()
    sender_ns = sandbox_info(pods.stack, sender)["namespaces"]["network"]
    receiver_ip = pods.status(receiver).status.network.ip

    def stats_of(sandbox_id: str) -> api_pb2.PodSandboxStats:
        return pods.stack.runtime.PodSandboxStats(
            api_pb2.PodSandboxStatsRequest(pod_sandbox_id=sandbox_id), timeout=10
        ).stats

    before_tx = stats_of(sender).linux.network.default_interface.tx_bytes.value
    before_rx = stats_of(receiver).linux.network.default_interface.rx_bytes.value
    in_netns(sender_ns, BUSYBOX, "ping", "-c", str(PINGS), "-i", "0.05", "-s", str(PAYLOAD), receiver_ip, timeout=60)

    sent = stats_of(sender).linux.network
    assert sent.default_interface.name == "eth0"
    assert [interface.name for interface in sent.interfaces] == ["eth0"]  # lo is not counted
    assert sent.default_interface.tx_bytes.value - before_tx >= PINGS * PAYLOAD
    assert sent.default_interface.HasField("tx_errors") and sent.default_interface.HasField("rx_errors")
    received = stats_of(receiver).linux.network.default_interface
    assert received.rx_bytes.value - before_rx >= PINGS * PAYLOAD
    assert received.tx_bytes.value >= PINGS * PAYLOAD  # the replies

    listed = pods.stack.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=10).stats
    by_id = {item.attributes.id: item for item in listed}
    assert by_id[sender].linux.network.default_interface.tx_bytes.value >= sent.default_interface.tx_bytes.value
    assert by_id[receiver].linux.network.default_interface.rx_bytes.value >= received.rx_bytes.value


def test_a_stopped_pod_namespace_is_not_kept_alive_by_its_stats(pods: Pods) -> None:
    sandbox_id = pods.run()
    netns = sandbox_info(pods.stack, sandbox_id)["namespaces"]["network"]
    pods.stack.runtime.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=sandbox_id), timeout=10)
    inode = Path(netns).stat().st_ino
    netd_pid = pods.stack.service_pid("netd")

    def held() -> list[str]:
        targets = []
        for fd in Path(f"/proc/{netd_pid}/fd").iterdir():
            try:
                targets.append(str(fd.readlink()))
            except OSError:
                pass
        return targets

    readers = sum(target.endswith("/net/dev") for target in held())
    assert readers >= 1  # the cached reader of the pod
    pods.stop(sandbox_id)
    # netd holds no descriptor of that namespace any more (it could not be freed).
    assert f"net:[{inode}]" not in held()
    assert sum(target.endswith("/net/dev") for target in held()) == readers - 1
