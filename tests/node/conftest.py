"""The node lane's fixtures: one guest for the session, pyrio installed in it
with `make install`, the kubelet running the static pods of provision.py.

Collected only by `make test-node` (PYRIO_NODE_LANE=1, see tests/conftest.py).
No /dev/kvm fails the lane: a node lane that skips proves nothing.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest

from tests.harness import wait_until
from tests.node.guest import Guest

GUEST_REPO = "/root/pyrio"
# The image's venv of pyrio's dependencies; run from GUEST_REPO, whose packages it imports.
VENV_PYTHON = "/opt/pyrio-deps/bin/python"
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/mnt/wheels", "PYRIO_PIP": "/opt/pyrio-deps/bin/pip"}
CRICTL = "/mnt/shared-bin/crictl"
SUPERVISOR_ENV = {"PYRIO_CONFIG": "/etc/pyrio/pyrio.toml", "PYRIO_PYTHON": "/opt/pyrio/venv/bin/python",
                  "PYRIO_SUPERVISOR_DIR": "/run/pyrio/supervisor"}
SERVICES = ("crigw", "imaged", "netd", "shimd")

# The node's pyrio.toml: the systemd cgroup driver, as the kubelet's.
NODE_CONFIG = """\
[runtime]
cgroup_manager = "systemd"
"""


class Node:
    """The guest with pyrio installed: crictl and kubelet helpers."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest

    def sh(self, script: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None):
        return self.guest.run(script, timeout=timeout, check=check, env=env)

    def crictl(self, *args: str, check: bool = True) -> str:
        return self.guest.run([CRICTL, *args], timeout=300, check=check).stdout

    def crictl_json(self, *args: str) -> Any:
        return json.loads(self.crictl(*args, "-o", "json"))

    def containers(self, name: str | None = None, all_states: bool = False) -> list[dict]:
        args = ["ps"] + (["-a"] if all_states else []) + (["--name", name] if name else [])
        return self.crictl_json(*args)["containers"]

    def inspect(self, container_id: str) -> dict:
        return self.crictl_json("inspect", container_id)

    def pods(self) -> list[dict]:
        return self.crictl_json("pods")["items"]

    def wait(self, predicate, timeout: float, what: str, interval: float = 5.0):
        return wait_until(predicate, timeout=timeout, interval=interval, what=what)

    def running_containers(self, names: tuple[str, ...]) -> dict[str, dict]:
        found = {c["metadata"]["name"]: c for c in self.containers() if c["state"] == "CONTAINER_RUNNING"}
        return found if all(name in found for name in names) else {}

    def container_pids(self) -> dict[str, int]:
        return {c["metadata"]["name"]: self.inspect(c["id"])["info"]["pid"]
                for c in self.containers() if c["state"] == "CONTAINER_RUNNING"}

    def socket_answers(self) -> bool:
        return self.guest.run([CRICTL, "version"], timeout=60).exit_code == 0

    def supervisorctl(self, *args: str) -> str:
        return self.guest.run(["/opt/pyrio/venv/bin/supervisorctl", "-c", "/etc/pyrio/supervisord.conf", *args],
                              env=SUPERVISOR_ENV, timeout=300).stdout


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    booted = Guest.boot()
    print(f"\nnode guest booted in {booted.meta['boot_seconds']}s", flush=True)
    try:
        yield booted
    finally:
        booted.shutdown()


@pytest.fixture(scope="session")
def guest_repo(guest: Guest) -> str:
    """This checkout copied into the guest (writable: make install builds in it)."""
    guest.run(f"rsync -a --delete --exclude .venv --exclude .git --exclude __pycache__ /mnt/pyrio/ {GUEST_REPO}/",
              timeout=1800, check=True)
    return GUEST_REPO


@pytest.fixture(scope="session")
def node(guest: Guest, guest_repo: str) -> Node:
    """pyrio installed by `make install` (systemd driver), the registry and the kubelet running."""
    guest.write_file("/etc/pyrio/pyrio.toml", NODE_CONFIG.encode())
    guest.run(f"make -C {guest_repo} install", env=OFFLINE_PIP, timeout=3600, check=True)
    node = Node(guest)
    node.wait(node.socket_answers, 300, "pyrio's socket")
    guest.run([VENV_PYTHON, "-m", "tests.node.provision", "registry", "kubelet"], cwd=guest_repo,
              timeout=1200, check=True)
    return node


@pytest.fixture(scope="session")
def static_pods(node: Node) -> Node:
    """The kubelet has the web and probe pods' containers running."""
    node.wait(lambda: node.running_containers(("server", "sidecar", "liveness")), 1800,
              "the static pods' containers to run")
    return node
