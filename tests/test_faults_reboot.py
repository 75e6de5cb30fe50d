"""A simulated node reboot (issue 6).

Stop the stack (supervisord), kill every shim, container and pod PID holder
of it (by PID), unmount everything it mounted, wipe its run dir and cgroups
as a reboot does (the state dir stays: it is on disk), then start again.
Sandboxes whose namespaces are gone are NOTREADY, containers EXITED with a
reason, and Stop/Remove of all of them succeed and leave nothing behind.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

from cri_api.v1 import api_pb2

from tests.fixtures_containers import CONTAINER_EXITED, CONTAINER_RUNNING, Containers, wait_for_log
from tests.fixtures_faults import TICKER, Patient, assert_no_leaks, stack_processes, wait_all_running
from tests.fixtures_pods import free_port, host_local_allocations
from tests.harness import Stack, cgroup_dirs, kill_pids, mounts_under, remove_cgroups, wait_until


def simulate_reboot(stack: Stack) -> None:
    assert stack.supervisord is not None
    stack.supervisord.send_signal(signal.SIGTERM)
    stack.supervisord.wait(60)
    wait_until(lambda: not kill_and_check(stack), 10, what="every process of the stack gone")
    for point in sorted(mounts_under(stack.root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=True)
    # /run is a tmpfs: its content is gone after a reboot (supervisord's logs
    # are kept for the test's sake: they do not hold pyrio state).
    for entry in stack.run_dir.iterdir():
        if entry != stack.supervisor_dir:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    remove_cgroups(stack.cgroup_parent)
    assert not cgroup_dirs(stack.cgroup_parent)


def kill_and_check(stack: Stack) -> list[int]:
    pids = stack_processes(stack)
    kill_pids(pids)
    return pids


def test_node_reboot(fault_containers: Containers, patient: Patient) -> None:
    containers = fault_containers
    stack = containers.stack
    # A pod with its own PID namespace and a host port, running a container,
    # one container that exited, and one never started.
    shared = containers.pod(pid_mode=api_pb2.POD, port_mappings=[(80, free_port())])
    running = containers.run(shared, name="main", command=TICKER)
    done = containers.run(shared, name="done", command=["sh", "-c", "exit 7"])
    created = containers.create(shared, containers.config("created", command=["sleep", "60"]))
    other = containers.pod()
    other_running = containers.run(other, name="main", command=["sleep", "3600"])
    wait_for_log(containers, running, "tick3")
    containers.wait_exited(done)
    assert host_local_allocations(stack)

    simulate_reboot(stack)
    # The kernel's boot id changes at a reboot: let the records say they
    # were made under another one.
    for record_file in (stack.state_dir / "shimd" / "containers").glob("*/record.json"):
        record = json.loads(record_file.read_text())
        record["boot_id"] = "the-boot-before"
        record_file.write_text(json.dumps(record))
    stack.start()
    wait_all_running(stack)

    pods = {item.id: item for item in patient.pods()}
    assert set(pods) == {shared[0], other[0]}
    for sandbox_id in (shared[0], other[0]):
        assert pods[sandbox_id].state == api_pb2.SANDBOX_NOTREADY
        request = api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)
        assert patient.call("PodSandboxStatus", request).status.state == api_pb2.SANDBOX_NOTREADY
    listed = {item.id: item for item in patient.containers()}
    assert set(listed) == {running, done, created, other_running}
    assert all(item.state == CONTAINER_EXITED for item in listed.values()), listed
    for container_id in (running, created, other_running):
        status = patient.status(container_id)
        assert status.state == CONTAINER_EXITED and status.reason
        assert "the node rebooted" in status.message and status.finished_at > 0
    status = patient.status(done)
    assert (status.exit_code, status.reason) == (7, "Error")
    # Nothing claims to run: a new pod and container work on the rebooted node.
    fresh = containers.pod()
    fresh_container = containers.run(fresh, name="main", command=["sleep", "3600"])
    assert patient.status(fresh_container).state == CONTAINER_RUNNING

    for sandbox_id in (shared[0], other[0], fresh[0]):
        patient.stop_pod(sandbox_id)
        patient.remove_pod(sandbox_id)
    assert patient.pods() == [] and patient.containers() == []
    assert_no_leaks(stack)
