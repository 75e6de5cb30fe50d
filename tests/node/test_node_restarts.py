"""Restarting pyrio (the unit, or one service under supervisord) never touches
a shim or a container; a guest reboot brings the static pods back.

Runs after test_node_kubelet.py (file order), on the same static pods.
"""

from __future__ import annotations

import pytest

from tests.node.conftest import SERVICES, Node

POD_CONTAINERS = ("server", "sidecar")


def shims(node: Node, pids: dict[str, int]) -> dict[str, int]:
    """Each container's shim: its process's parent (runc/crun leave the container under the shim)."""
    def parent(pid: int) -> int:
        status = node.guest.read_file(f"/proc/{pid}/status")
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return {name: parent(pid) for name, pid in pids.items() if name in POD_CONTAINERS}


def assert_untouched(node: Node, before: dict[str, int], before_shims: dict[str, int], what: str) -> None:
    node.wait(node.socket_answers, 300, f"pyrio's socket after {what}")
    after = node.container_pids()
    for name in POD_CONTAINERS:
        assert after.get(name) == before[name], f"{name} after {what}: pid {after.get(name)}, was {before[name]}"
    assert shims(node, after) == before_shims, f"a shim changed across {what}"


def test_systemctl_restart_pyrio_keeps_every_container(static_pods: Node) -> None:
    before = static_pods.container_pids()
    before_shims = shims(static_pods, before)
    static_pods.guest.run(["systemctl", "restart", "pyrio.service"], timeout=300, check=True)
    assert_untouched(static_pods, before, before_shims, "systemctl restart pyrio")


def test_systemctl_stop_pyrio_keeps_every_container(static_pods: Node) -> None:
    before = static_pods.container_pids()
    before_shims = shims(static_pods, before)
    guest = static_pods.guest
    guest.run(["systemctl", "stop", "pyrio.service"], timeout=300, check=True)
    try:
        for name, pid in [*before.items(), *before_shims.items()]:
            assert guest.run(["kill", "-0", str(pid)]).exit_code == 0, f"{name}'s pid {pid} died with the unit"
    finally:
        guest.run(["systemctl", "start", "pyrio.service"], timeout=300, check=True)
    assert_untouched(static_pods, before, before_shims, "systemctl stop/start pyrio")


@pytest.mark.parametrize("service", SERVICES)
def test_supervisorctl_restart_keeps_every_container(static_pods: Node, service: str) -> None:
    before = static_pods.container_pids()
    before_shims = shims(static_pods, before)
    assert "started" in static_pods.supervisorctl("restart", service)
    assert_untouched(static_pods, before, before_shims, f"supervisorctl restart {service}")


def test_after_a_guest_reboot_the_kubelet_brings_the_static_pods_back(static_pods: Node) -> None:
    before = static_pods.container_pids()
    static_pods.guest.reboot()
    running = static_pods.wait(lambda: static_pods.running_containers(POD_CONTAINERS), 1800,
                               "the static pods to run again after the reboot")
    after = static_pods.container_pids()
    assert set(running) >= set(POD_CONTAINERS)
    assert all(after[name] != before[name] for name in POD_CONTAINERS)  # new processes of a new boot
