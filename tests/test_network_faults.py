"""Faults around pod networking, each on a private stack: broken CNI config,
a failing plugin, and netd SIGKILLed during and after RunPodSandbox.

After every fault the node must hold nothing of the pod: no veth, no IP in
the host-local store, no pinned namespace or mount, no portmap chain, no record.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_pods import (
    FAULT_PLUGIN_MESSAGE,
    FaultStack,
    Pods,
    free_port,
    host_local_allocations,
    pod_config,
    sandbox_info,
)
from services.netd import pod_init
from tests.harness import Stack, leak_report, wait_until


def network_condition(stack: Stack) -> api_pb2.RuntimeCondition:
    reply = stack.runtime.Status(api_pb2.StatusRequest(), timeout=10)
    return {condition.type: condition for condition in reply.status.conditions}["NetworkReady"]


def pod_leaks(stack: Stack) -> dict[str, list]:
    report = leak_report(stack)
    # Processes are judged by pod only (PID holders): shimd's own helpers are not pods.
    report["processes"] = [pid for pid in report["processes"] if pod_init.holds_sandbox_of_any(pid)]
    return {kind: found for kind, found in report.items() if found}


def assert_nothing_left(stack: Stack) -> None:
    """No pod of this stack holds anything on the node any more."""
    report = pod_leaks(stack)
    assert not report, report
    assert host_local_allocations(stack) == []
    assert stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items == []
    netd_state = stack.state_dir / "netd"
    for sub in ("sandboxes", "cni", "pods"):
        directory = netd_state / sub
        assert not directory.exists() or [p.name for p in directory.iterdir()] == [], f"{directory} not empty"
    for kind in ("netns", "ipcns", "utsns", "pidns"):
        directory = stack.run_dir / kind
        assert not directory.exists() or list(directory.iterdir()) == [], f"{directory} not empty"


def assert_new_pod_works_and_leaves_nothing(stack: Stack, pods: Pods, config: api_pb2.PodSandboxConfig) -> None:
    sandbox_id = pods.run(config)
    assert pods.status(sandbox_id).status.network.ip
    pods.remove(sandbox_id)
    assert_nothing_left(stack)


def kill_netd(stack: Stack) -> int:
    pid = stack.service_pid("netd")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: stack.service_pid("netd") not in (0, pid), 30, what="netd restarted")
    stack.wait_service_running("netd")
    return pid


def test_broken_cni_config_reported_and_refused_cleanly(fresh_stack: Stack) -> None:
    pods = Pods(fresh_stack)
    conf = next(fresh_stack.cni_config_dir.iterdir())
    good = conf.read_text()
    try:
        cases = [("{not json", "10-test.conflist"), (good.replace('"portmap"', '"no-such-plugin"'), "no-such-plugin")]
        for text, expected in cases:
            conf.write_text(text)
            condition = network_condition(fresh_stack)
            assert condition.status is False and expected in condition.message
            with pytest.raises(grpc.RpcError) as caught:
                pods.run(pod_config())
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert expected in caught.value.details()
            assert_nothing_left(fresh_stack)
            # A hostNetwork pod needs no CNI network and still runs.
            host_pod = pods.run(pod_config(host_network=True))
            pods.remove(host_pod)
        # A fixed config is picked up without a restart.
        conf.write_text(good)
        wait_until(lambda: network_condition(fresh_stack).status, 10, what="NetworkReady")
        assert_new_pod_works_and_leaves_nothing(fresh_stack, pods, pod_config())
    finally:
        pods.cleanup()


def test_plugin_error_returned_verbatim_and_everything_cleaned(fault_stack: FaultStack) -> None:
    pods = Pods(fault_stack)
    fault_stack.set_fault("fail")
    with pytest.raises(grpc.RpcError) as caught:
        pods.run(pod_config(port_mappings=[(80, free_port())]))
    assert FAULT_PLUGIN_MESSAGE in caught.value.details()
    assert 'plugin type="pyrio-test-fault"' in caught.value.details()
    # The bridge plugin had made a veth and allocated an IP before the fault.
    assert fault_stack.add_started()
    assert_nothing_left(fault_stack)
    fault_stack.set_fault("ok")
    assert_new_pod_works_and_leaves_nothing(fault_stack, pods, pod_config())


def test_netd_killed_between_run_and_stop(fault_stack: FaultStack) -> None:
    pods = Pods(fault_stack)
    try:
        sandbox_id = pods.run(pod_config(port_mappings=[(80, free_port())], pid_mode=api_pb2.POD))
        info = sandbox_info(fault_stack, sandbox_id)
        assert info["network"]["ip"] in host_local_allocations(fault_stack)
        kill_netd(fault_stack)
        # The restarted netd knows the pod from its records and CNI cache.
        status = pods.status(sandbox_id).status
        assert status.state == api_pb2.SANDBOX_READY and status.network.ip == info["network"]["ip"]
        pods.stop(sandbox_id)
        assert host_local_allocations(fault_stack) == []
        assert leak_report(fault_stack)["veths"] == [] and leak_report(fault_stack)["iptables_chains"] == []
        pods.remove(sandbox_id)
        assert_nothing_left(fault_stack)
    finally:
        pods.cleanup()


def test_netd_killed_during_run_is_cleaned_up_at_restart(fault_stack: FaultStack) -> None:
    pods = Pods(fault_stack)
    fault_stack.set_fault("hang")
    config = pod_config(port_mappings=[(80, free_port())], pid_mode=api_pb2.POD)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["id"] = pods.run(config)
        except grpc.RpcError as exc:
            outcome["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    try:
        sandbox_id = wait_until(fault_stack.add_started, 30, what="CNI ADD in progress")
        # Mid-ADD the pod holds a pinned netns, a veth and an IP.
        assert host_local_allocations(fault_stack)
        assert Path(fault_stack.run_dir / "netns" / sandbox_id).exists()
        fault_stack.set_fault("ok")
        kill_netd(fault_stack)
        runner.join(60)
        assert isinstance(outcome.get("error"), grpc.RpcError)
        assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
        # The restarted netd's clean-up runs in the background of this test:
        # wait for all of it (the IP is released first, the mounts last).
        wait_until(lambda: not host_local_allocations(fault_stack) and not pod_leaks(fault_stack), 30,
                   what="the interrupted pod cleaned up after restart")
        assert_nothing_left(fault_stack)
        # The name is free again, and the network works.
        assert_new_pod_works_and_leaves_nothing(fault_stack, pods, config)
    finally:
        runner.join(5)
        pods.cleanup()


def test_plugins_get_the_cni_environment_and_runtime_config(fault_stack: FaultStack) -> None:
    pods = Pods(fault_stack)
    host_port = free_port()
    config = pod_config(
        port_mappings=[(8080, host_port)], dns={"servers": ["10.96.0.10"], "searches": ["svc.local"], "options": ["ndots:2"]}
    )
    try:
        sandbox_id = pods.run(config)
        info = sandbox_info(fault_stack, sandbox_id)
        add = fault_stack.plugin_saw("ADD")
        assert add["env"]["CNI_COMMAND"] == "ADD"
        assert add["env"]["CNI_CONTAINERID"] == sandbox_id
        assert add["env"]["CNI_NETNS"] == info["namespaces"]["network"]
        assert add["env"]["CNI_IFNAME"] == "eth0"
        assert "/usr/lib/cni" in add["env"]["CNI_PATH"].split(":")
        cni_args = dict(pair.split("=", 1) for pair in add["env"]["CNI_ARGS"].split(";"))
        assert cni_args["K8S_POD_NAME"] == config.metadata.name
        assert cni_args["K8S_POD_NAMESPACE"] == config.metadata.namespace
        assert cni_args["K8S_POD_UID"] == config.metadata.uid
        assert cni_args["K8S_POD_INFRA_CONTAINER_ID"] == sandbox_id
        stdin = add["stdin"]
        assert stdin["name"] == "pyrio-test" and stdin["cniVersion"] == "1.0.0"
        assert stdin["runtimeConfig"] == {
            "portMappings": [{"hostPort": host_port, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"}],
            "dns": {"servers": ["10.96.0.10"], "searches": ["svc.local"], "options": ["ndots:2"]},
        }
        # The chained plugin sees the bridge's result.
        assert any(ip["address"].startswith(info["network"]["ip"] + "/") for ip in stdin["prevResult"]["ips"])
        pods.stop(sandbox_id)
        deleted = fault_stack.plugin_saw("DEL")
        assert deleted["env"]["CNI_COMMAND"] == "DEL" and deleted["env"]["CNI_CONTAINERID"] == sandbox_id
        assert deleted["stdin"]["runtimeConfig"] == stdin["runtimeConfig"]
        assert deleted["stdin"]["prevResult"]["ips"]
        pods.remove(sandbox_id)
        assert_nothing_left(fault_stack)
    finally:
        pods.cleanup()


def test_netd_killed_during_stop_then_stop_again_releases_everything(fault_stack: FaultStack) -> None:
    pods = Pods(fault_stack)
    outcome: dict[str, object] = {}
    try:
        sandbox_id = pods.run(pod_config(port_mappings=[(80, free_port())]))
        fault_stack.set_fault("hang-del")

        def stop() -> None:
            try:
                pods.stop(sandbox_id)
                outcome["ok"] = True
            except grpc.RpcError as exc:
                outcome["error"] = exc

        stopper = threading.Thread(target=stop)
        stopper.start()
        wait_until(fault_stack.del_started, 30, what="CNI DEL in progress")
        # Mid-DEL: portmap's rules are gone, the bridge still holds the veth and IP.
        assert host_local_allocations(fault_stack)
        fault_stack.set_fault("ok")
        kill_netd(fault_stack)
        stopper.join(60)
        # Stop is idempotent: the gateway may have sent it again to the new netd.
        assert outcome.get("ok") or outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
        pods.stop(sandbox_id)
        assert pods.status(sandbox_id).status.state == api_pb2.SANDBOX_NOTREADY
        assert host_local_allocations(fault_stack) == []
        pods.remove(sandbox_id)
        assert_nothing_left(fault_stack)
    finally:
        pods.cleanup()
