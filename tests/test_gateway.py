"""The gateway through real gRPC on its unix socket, with every daemon under supervisord."""

from __future__ import annotations

import os
import signal
import stat
import time

import grpc
import pytest
from cri_api.v1 import api_pb2

from common.config import load_config
from common.daemon import client_for
from common.errors import Unavailable
from tests.harness import Stack, wait_until


def conditions(stack: Stack) -> dict[str, api_pb2.RuntimeCondition]:
    reply = stack.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    return {condition.type: condition for condition in reply.status.conditions}


def test_version(stack: Stack) -> None:
    reply = stack.runtime.Version(api_pb2.VersionRequest(version="v1"), timeout=5)
    assert reply.runtime_name == "pyrio"
    assert reply.runtime_api_version == "v1"
    assert reply.runtime_version == "0.1.0"


def test_socket_mode(stack: Stack) -> None:
    mode = stat.S_IMODE(os.stat(stack.socket).st_mode)
    assert mode == 0o660
    assert stat.S_ISSOCK(os.stat(stack.socket).st_mode)


def test_status_ready(stack: Stack) -> None:
    found = conditions(stack)
    assert found["RuntimeReady"].status is True
    assert found["NetworkReady"].status is True, found["NetworkReady"].message


def test_runtime_config_reports_the_configured_cgroup_driver(stack: Stack) -> None:
    reply = stack.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=5)
    expected = api_pb2.SYSTEMD if stack.cgroup_manager == "systemd" else api_pb2.CGROUPFS
    assert reply.linux.cgroup_driver == expected


def test_unbuilt_rpc_is_unimplemented_with_its_name(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stack.runtime.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id="x"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CheckpointContainer" in caught.value.details()


def test_each_call_logged_once(stack: Stack) -> None:
    stack.runtime.Version(api_pb2.VersionRequest(), timeout=5)
    stack.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=5)
    log = wait_until(lambda: (text := stack.logs("crigw")) and '"method": "RuntimeConfig"' in text and text, 5)
    line = [entry for entry in log.splitlines() if '"method": "RuntimeConfig"' in entry][-1]
    assert '"code": "OK"' in line and '"duration_ms"' in line


def test_network_not_ready_without_cni_config(fresh_stack: Stack) -> None:
    conf = next(fresh_stack.cni_config_dir.iterdir())
    saved = conf.read_text()
    conf.unlink()
    found = conditions(fresh_stack)
    assert found["NetworkReady"].status is False
    assert "no CNI network config" in found["NetworkReady"].message
    (fresh_stack.cni_config_dir / "5-broken.conflist").write_text("{not json")
    found = conditions(fresh_stack)
    assert found["NetworkReady"].status is False and "5-broken.conflist" in found["NetworkReady"].message
    conf.write_text(saved)
    # The valid file is now found after the broken one; no restart needed.
    assert conditions(fresh_stack)["NetworkReady"].status is True
    # A conflist naming a plugin that does not exist is not a usable network.
    (fresh_stack.cni_config_dir / "5-broken.conflist").unlink()
    conf.write_text(saved.replace('"portmap"', '"no-such-plugin"'))
    found = conditions(fresh_stack)
    assert found["NetworkReady"].status is False and "no-such-plugin" in found["NetworkReady"].message


def _cri_call_needing(stack: Stack, service: str) -> None:
    if service == "imaged":
        stack.images.ListImages(api_pb2.ListImagesRequest(), timeout=10)
    else:
        stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10)


@pytest.mark.parametrize("service, condition", [("imaged", "RuntimeReady"), ("netd", "NetworkReady")])
def test_killed_daemon_reported_then_restarted(fresh_stack: Stack, service: str, condition: str) -> None:
    _cri_call_needing(fresh_stack, service)
    pid = fresh_stack.service_pid(service)
    assert fresh_stack.supervisord is not None
    # Freeze supervisord so the outage lasts until we have looked at it;
    # SIGCONT then lets it notice the death and restart the daemon.
    os.kill(fresh_stack.supervisord.pid, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}/status") or "zombie" in open(f"/proc/{pid}/status").read(), 5)
        started = time.monotonic()
        found = conditions(fresh_stack)
        assert time.monotonic() - started < 5, "Status hung while a daemon was down"
        assert found[condition].status is False
        assert service in found[condition].message
        # A CRI call that needs the dead daemon answers UNAVAILABLE promptly, not a hang.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            _cri_call_needing(fresh_stack, service)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert service in caught.value.details()
        assert time.monotonic() - started < 5
        # And so does the RPC layer itself.
        client = client_for(load_config(str(fresh_stack.config_path)), service, timeout=10)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            client.call("health")
        assert time.monotonic() - started < 5
        client.close()
    finally:
        os.kill(fresh_stack.supervisord.pid, signal.SIGCONT)
    new_pid = fresh_stack.wait_service_running(service)
    assert new_pid != pid
    wait_until(lambda: conditions(fresh_stack)[condition].status, 20, what=f"{condition} true again")
    _cri_call_needing(fresh_stack, service)
